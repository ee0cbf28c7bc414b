"""The soak (tests/reliability/soak.py): 8 API clients asking for mixed adapters in every dialect while another
client swaps, merges, unmerges and loads adapters. Every answer equals plain PEFT's greedy text for its own
stack, none is lost or duplicated, and the server's threads and open files do not grow. The short run is
part of the suite; the long one runs with `./run-tests.sh --soak` (and `python -m bench --only soak`)."""
import pytest

from tests.reliability.soak import run_soak, write_adapters


@pytest.fixture(scope="module")
def soak_loras(tiny_models, tmp_path_factory):
    return write_adapters(tiny_models["llama"], tmp_path_factory.mktemp("soak-loras"))


def check(result, clients: int, requests: int) -> None:
    print(result.summary())
    detail = "\n".join(result.problems[:20])
    assert result.requests == clients * requests and result.errors == 0, detail  # none lost, none failed
    assert result.wrong == 0, detail
    assert result.duplicate_ids == 0
    assert result.state_errors == 0, detail
    assert result.swaps and result.merges and result.unmerges and result.loads  # the state really changed
    # no leak: a leak grows with the requests (48 here, 480 in the long run); the slack is for the server's
    # worker-thread pool, which grows to the peak concurrency it has seen (anyio caps it at 40) — measured
    # +4 after the short run and +6 after the long one
    assert result.threads[1] <= result.threads[0] + 8, result.summary()
    assert result.fds[1] <= result.fds[0] + 4, result.summary()


def test_soak_short(tiny_models, soak_loras):
    check(run_soak(tiny_models["llama"], soak_loras, clients=8, requests=6), 8, 6)


@pytest.mark.soak
def test_soak_long(tiny_models, soak_loras):
    check(run_soak(tiny_models["llama"], soak_loras, clients=8, requests=60, max_tokens=16), 8, 60)
