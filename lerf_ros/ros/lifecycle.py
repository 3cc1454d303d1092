"""What the trainer and query nodes share as managed (``rclpy.lifecycle``) nodes.

States and what the nodes do on each transition (README "Lifecycle"):
- unconfigured: parameters declared and checked (a bad one stops the process, as before); no engine.
- configure: build the engine / load the map (encoders and weights); a failure logs the reason, returns
  FAILURE and leaves the node unconfigured.
- activate: take frames, train, answer; deactivate: stop taking frames, pause training, refuse queries
  ("not active"); cleanup: stop the threads, drop the engine, release CUDA's cache.

``autostart`` (parameter, default true) makes the node configure and activate itself in its constructor,
so that ``lerf_node`` without a lifecycle manager behaves as it did before the nodes were managed; a
failed configure then raises the error that caused it (``main.run`` turns it into exit status 2).

A ``ChangeState`` request for a transition the current state does not have is refused here, with a log
line naming the state and the transitions it has: rclpy's own handler lets the state machine's RCLError
escape the service callback (which would end the executor's spin) and, for a label, answers
``success=false`` without a word.
"""

from __future__ import annotations

from rclpy.lifecycle import TransitionCallbackReturn

SUCCESS = TransitionCallbackReturn.SUCCESS
FAILURE = TransitionCallbackReturn.FAILURE


def state_label(node) -> str:
    """The node's lifecycle state: 'unconfigured', 'inactive', 'active', 'finalized', or a transition."""
    # rclpy (Jazzy) has no public getter of the current state; the state machine is the source of truth.
    return node._state_machine.current_state[1]


def available_transitions(node) -> list[tuple[int, str]]:
    """(id, label) of the transitions the node's current state has."""
    return [(t[0], t[1]) for t in node._state_machine.available_transitions]


def guard_change_state(node) -> None:
    """Refuse (``success=false`` + a warning naming the state) a ChangeState request the current state has
    no transition for, before rclpy's handler sees it."""
    service = getattr(node, "_service_change_state", None)
    if service is None:  # enable_communication_interface=False: no service to guard
        return
    original = service.callback

    def on_change_state(request, response):
        transitions = available_transitions(node)
        wanted_id, wanted_label = request.transition.id, request.transition.label
        if wanted_label:
            ok = any(label == wanted_label for _, label in transitions)
        else:
            ok = any(tid == wanted_id for tid, _ in transitions)
        if not ok:
            response.success = False
            names = ", ".join(label for _, label in transitions) or "none"
            asked = f"'{wanted_label}'" if wanted_label else f"id {wanted_id}"
            node.get_logger().warning(
                f"lifecycle transition {asked} refused: not possible in state '{state_label(node)}' "
                f"(possible: {names})")
            return response
        return original(request, response)

    service.callback = on_change_state


def autostart(node, configure_error) -> None:
    """Configure and activate ``node`` now (``autostart:=true``), from its constructor. ``configure_error()``:
    the exception that made configure fail (raised from here, the node destroyed); an activate that fails
    raises RuntimeError."""
    if node.trigger_configure() != SUCCESS:
        error = configure_error()
        node.destroy_node()  # the constructor raises: nobody else holds the node to destroy it
        raise error if error is not None else RuntimeError(f"{node.get_name()}: configure failed")
    if node.trigger_activate() != SUCCESS:
        node.shutdown()
        node.destroy_node()
        raise RuntimeError(f"{node.get_name()}: activate failed (see the log)")
    node.get_logger().info("autostart: configured and active")


def release_cuda_cache() -> None:
    """Give the CUDA caching allocator's free blocks back to the driver (after the engine is dropped)."""
    import gc

    import torch

    gc.collect()  # the engine's tensors go when its last reference does; cycles need a collection
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
