"""The worker side of a rank that runs without gpukv (no server when it started, a refused
configuration) while its scheduler may still plan loads for it: every planned load is reported
failed, so vLLM recomputes those tokens, and every fence it is told to release is released at
once (it copies nothing). It answers the hooks :class:`.worker.WorkerSide` answers, in the same
form: failed blocks with one KV cache group, failed requests with several (vLLM cannot map
block ids of several groups back to requests), and asynchronous loads reported received."""

from __future__ import annotations

from gpukv.integrations.vllm.plan import StepPlan


class UnconnectedWorker:
    """Reports what a worker without gpukv cannot do (see the module docstring)."""

    def __init__(self, *, num_groups: int, async_loads: bool) -> None:
        self.by_request = num_groups > 1
        self.async_loads = async_loads
        self._blocks: set[int] = set()  # planned loads' blocks (one group)
        self._requests: set[str] = set()  # planned loads' requests (several groups)
        self._unreceived: set[str] = set()  # asynchronous loads to report received

    def preempted(self, plan: StepPlan) -> None:
        """Nothing copies here: nothing to fence."""

    def load(self, plan: StepPlan) -> None:
        for spec in plan.loads:
            if self.by_request:
                self._requests.add(spec.request_id)
            else:
                self._blocks.update(spec.report_blocks)
            if self.async_loads:
                self._unreceived.add(spec.request_id)

    def finished(self, plan: StepPlan) -> tuple[set[str], set[str]]:
        """(the fences to release: all of them, the asynchronous loads to report received)."""
        recving, self._unreceived = self._unreceived, set()
        return set(plan.released), recving

    def take_failed_blocks(self) -> set[int]:
        failed, self._blocks = self._blocks, set()
        return failed

    def take_failed_requests(self) -> set[str]:
        failed, self._requests = self._requests, set()
        return failed
