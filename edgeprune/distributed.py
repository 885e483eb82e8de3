"""Self-Pruner fitness evaluations on a Ray cluster (``--ray ADDRESS`` or ``--opt ray=ADDRESS``).

Install with ``pip install 'edgeprune[ray]'`` (not part of the default install).

* The fitness closure (dense model, scores, groups, allocation options, fitness token ids) is serialised once
  (cloudpickle, ``ray.put``) and every candidate layer-rate vector is **one Ray task** (``num_cpus=1``): one
  candidate per worker. It is the very function the serial search calls, so results match it exactly when the
  arithmetic matches: the task sets torch's thread count to the driver's (Ray workers default to 1 thread, and a
  matmul's reduction order can depend on the thread count). On a cluster of identical nodes the Ray-backed
  search therefore equals the serial one with the same seed; across different CPUs it can differ in the last
  bits of a perplexity.
* Parallelism without changing the search loop: :class:`PrefetchBackend` wraps the proposal backend; as soon as
  a generation's children are proposed it repairs them exactly as :func:`edgeprune.self_pruner.search` will and
  submits them all; the search then asks for each fitness in its usual order and :class:`RayEvaluator` waits
  on the already-running task. Vectors already evaluated are never resubmitted.
* A task whose worker dies (process killed, node lost) is retried elsewhere by Ray (``max_retries``, default
  3); an exception raised *inside* the fitness is not retried (it is deterministic) and propagates.

``ADDRESS``: ``local`` starts a local Ray instance with ``ray_cpus`` CPUs (default: all); ``auto`` joins the
cluster started with ``ray start``; ``ray://host:10001`` or ``host:6379`` join a remote one. If this process
already called ``ray.init`` the existing connection is used.
"""
from __future__ import annotations

import torch

from .errors import EdgepruneError
from .self_pruner.search import genome_key


def _ray():
    try:
        import ray
    except ImportError:
        raise EdgepruneError("--ray needs the ray package: pip install 'edgeprune[ray]'") from None
    return ray


_TASK = None


def _task():
    global _TASK
    if _TASK is None:
        ray = _ray()

        @ray.remote(num_cpus=1)
        def fitness_task(fn, p, threads):
            import torch as _torch

            if threads:
                _torch.set_num_threads(int(threads))
            return float(fn(p))

        _TASK = fitness_task
    return _TASK


def init(address: str, num_cpus: int | None = None) -> None:
    ray = _ray()
    if ray.is_initialized():
        return
    kw = dict(include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    if address in ("local", "", None):
        ray.init(num_cpus=num_cpus, **kw)
    else:
        ray.init(address=address, **kw)


class RayEvaluator:
    """A drop-in ``fitness(p)`` that runs on Ray; :meth:`submit` starts candidates ahead of time."""

    def __init__(self, fitness, address: str = "local", max_retries: int = 3, num_cpus: int | None = None):
        ray = _ray()
        init(address, num_cpus)
        self.ray, self.max_retries = ray, int(max_retries)
        self.threads = torch.get_num_threads()
        self.fn_ref = ray.put(fitness)
        self.pending: dict[tuple, object] = {}
        self.done: dict[tuple, float] = {}
        self.submitted = 0

    def submit(self, candidates) -> None:
        task = _task()
        for c in candidates:
            k = genome_key(c)
            if k in self.pending or k in self.done:
                continue
            self.pending[k] = task.options(max_retries=self.max_retries, retry_exceptions=False).remote(
                self.fn_ref, [float(x) for x in c], self.threads)
            self.submitted += 1

    def __call__(self, p) -> float:
        k = genome_key(p)
        if k not in self.done:
            if k not in self.pending:
                self.submit([p])
            self.done[k] = self.ray.get(self.pending.pop(k))
        return self.done[k]


class PrefetchBackend:
    """Wraps a proposal backend: submits every proposed child (repaired as the search will) to the evaluator."""

    def __init__(self, backend, evaluator: RayEvaluator):
        self.backend, self.evaluator = backend, evaluator
        self.name = backend.name

    def propose(self, op, space, pop, k, rng):
        from .self_pruner.search import repair

        raw, notes = self.backend.propose(op, space, pop, k, rng)
        self.evaluator.submit([repair(c, space) for c in raw][:k])
        return raw, notes

    def __getattr__(self, name):
        return getattr(self.backend, name)
