"""One rank of the persistent 2-process gloo world the megatron tests run in (started by gloo_pool.py).

Protocol (multiprocessing.connection, authenticated): the test process sends
``(file, function_name, args, kwargs, tp)`` (plain pickle: torch's multiprocessing reducers would
hand tensors over through shared memory, which needs a shared authkey); the worker re-initialises
Megatron's parallel state with tensor_model_parallel_size=tp, imports ``file`` (cached), calls
``function(*args, **kwargs)`` and sends back ``("ok", result)`` or ``("error", traceback_text)``.
``None`` ends the worker.

Megatron's ``destroy_model_parallel`` drops its process groups without destroying them, and every
``initialize_model_parallel`` creates dozens of new ones (each gloo group keeps threads). Re-initialising
for every test leaked ~2700 threads per worker over the suite, which kept burning CPU during the later
tests; so the state is rebuilt only when ``tp`` changes, and the old groups are destroyed first.
"""

import importlib.util
import os
import pickle
import sys
import traceback
from multiprocessing.connection import Client

import torch
import torch.distributed as dist


def _reinitialise(parallel_state, tp: int) -> None:
    """Megatron's parallel state for ``tp``, after destroying every group the previous one created."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
        world = dist.group.WORLD
        for group in list(dist.distributed_c10d._world.pg_map):
            if group is not world:
                dist.destroy_process_group(group)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)


def main() -> None:
    rank, world, dist_port, ctl_port = (int(a) for a in sys.argv[1:5])
    authkey = os.environ["DPKD_TEST_AUTHKEY"].encode()
    torch.set_num_threads(1)
    conn = Client(("127.0.0.1", ctl_port), authkey=authkey)
    conn.send(rank)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{dist_port}", rank=rank, world_size=world)
    from megatron.core import parallel_state

    modules = {}
    current_tp = None
    while True:
        task = pickle.loads(conn.recv_bytes())
        if task is None:
            break
        path, name, args, kwargs, tp = task
        try:
            if tp != current_tp:
                _reinitialise(parallel_state, tp)
                current_tp = tp
            if path not in modules:
                spec = importlib.util.spec_from_file_location(f"_dpkd_megatron_test_{len(modules)}", path)
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                modules[path] = module
            result = getattr(modules[path], name)(*args, **kwargs)
            conn.send_bytes(pickle.dumps(("ok", result)))
        except BaseException:  # report everything; the test process turns it into a failure
            conn.send_bytes(pickle.dumps(("error", traceback.format_exc())))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
