"""Language targets and queries: the CLIP pyramid, dense (DINO) features, relevancy, candidate points,
the 3D query."""
