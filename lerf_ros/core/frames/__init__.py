"""Frames, cameras and keyframes: what comes in, where it was seen from, what is kept."""
