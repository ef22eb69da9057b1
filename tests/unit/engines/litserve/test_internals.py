"""Each private LitServe touch point, checked against the installed LitServe: a version that moves
one fails here, by name, instead of somewhere in the request path."""

from __future__ import annotations

import inspect

import litserve as ls
import pytest
from litserve.utils import WorkerSetupStatus

from timmserve.engines.litserve import internals


def test_the_pinned_version_is_installed():
    assert ls.__version__ == "0.2.19", "litserve_internals was written against 0.2.19: re-check each touch point"


def test_a_worker_hands_control_to_its_loop_with_its_id_once_ready():
    # worker.WorkerLoop takes (lit_api, device, worker_id, …) and serves until its stop message.
    source = inspect.getsource(ls.loops.loops.inference_worker)
    ready = source.index("WorkerSetupStatus.READY")
    call = source.index("loop(\n        lit_api,\n        device,\n        worker_id,")
    assert ready < call, "the worker must be marked ready before its loop runs"


def test_each_api_server_gets_its_number_on_the_spec_and_sees_every_worker():
    source = inspect.getsource(ls.LitServer._start_server)
    assert "for response_queue_id in range(num_uvicorn_servers):" in source
    assert "lit_api.spec.response_queue_id = response_queue_id" in source
    run = inspect.getsource(ls.LitServer.run)
    # The workers are launched (and listed) before the API servers are forked.
    assert run.index("self.inference_workers.extend(") < run.index("self._start_server(")


def test_worker_status_keys_are_litservers_own():
    source = inspect.getsource(ls.LitServer.launch_inference_worker)
    assert 'self.workers_setup_status[f"{endpoint}_{worker_id}"]' in source
    assert 'endpoint = lit_api.api_path.split("/")[-1]' in source
    assert internals.worker_status_key("/predict", 2) == "predict_2"
    statuses = {"predict_0": WorkerSetupStatus.READY, "predict_1": WorkerSetupStatus.STARTING}
    assert internals.worker_ready(statuses, "/predict", 0)
    assert not internals.worker_ready(statuses, "/predict", 1)
    assert not internals.all_workers_ready(statuses)
    assert not internals.all_workers_ready({})


@pytest.mark.parametrize("name", internals.OVERRIDDEN_SERVER_METHODS)
def test_every_overridden_server_method_exists_with_the_signature_we_override(name):
    from timmserve.engines.litserve.server import TimmServer

    theirs = inspect.signature(getattr(ls.LitServer, name))
    ours = inspect.signature(getattr(TimmServer, name))
    assert list(ours.parameters)[: len(theirs.parameters)] == list(theirs.parameters) or "kwargs" in ours.parameters


def test_the_monitor_is_the_named_thread_that_ends_with_the_shutdown_event():
    source = inspect.getsource(ls.LitServer._start_worker_monitoring)
    assert f'name="{internals.MONITOR_THREAD_NAME}"' in source
    assert "while not self._shutdown_event.is_set():" in source


def test_each_api_server_runs_the_lifespan_the_server_object_has():
    # TimmServer.lifespan starts the inline lane in each API server: LitServe must take the app's
    # lifespan from the instance, where the override is.
    assert "FastAPI(lifespan=self.lifespan" in inspect.getsource(ls.LitServer.__init__)
