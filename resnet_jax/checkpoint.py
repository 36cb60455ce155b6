"""Orbax checkpoints of the train state, written by every process and restored onto a mesh.

The data order is a function of (seed, step), so the step inside the state is the whole
iterator state and a restored run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import orbax.checkpoint as ocp


class Manager:
    """Asynchronous saves, the last `config.keep_checkpoints` kept, restore of the newest."""

    def __init__(self, directory: str, config):
        options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True)
        self._manager = ocp.CheckpointManager(directory, options=options)

    def save(self, step: int, state) -> None:
        self._manager.save(step, args=ocp.args.StandardSave(state))

    def restore(self, abstract_state, step: int | None = None):
        """Checkpoint `step` (default: the newest) laid out as `abstract_state` says, or None."""
        step = self._manager.latest_step() if step is None else step
        if step is None or step not in self._manager.all_steps():
            return None
        return self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
