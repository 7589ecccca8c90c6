"""``gossip`` settings: old configs keep their meaning; compression combinations that cannot work are refused
before anything starts, with the setting and the fix named."""

import pytest

from deca_ds.config import ConfigError, load_config


def test_old_gossip_settings_load_unchanged():
    cfg = load_config(None, ["gossip.dtype=bf16", "gossip.chunk_mb=8"])
    assert (cfg.gossip.dtype, cfg.gossip.chunk_mb, cfg.gossip.compression) == ("bf16", 8.0, "none")
    assert load_config(None, []).gossip.compression == "none"


@pytest.mark.parametrize("overrides,words", [
    (["gossip.compression=int2"], ["gossip.compression='int2' is not known", "none, bf16, int8, int4"]),
    (["gossip.compression=int8", "gossip.dtype=bf16"], ["gossip.dtype=bf16", "remove gossip.dtype"]),
    (["gossip.compression=int4", "topology.name=one_peer_exponential"],
     ["one_peer_exponential changes neighbours every step", "gossip.compression=none"]),
])
def test_compression_combinations_that_cannot_work_are_refused(overrides, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


@pytest.mark.parametrize("compression", ["bf16", "int8", "int4"])
def test_compression_on_a_static_graph_loads(compression):
    cfg = load_config(None, [f"gossip.compression={compression}", "topology.name=ring"])
    assert (cfg.gossip.compression, cfg.gossip.dtype) == (compression, "fp32")
