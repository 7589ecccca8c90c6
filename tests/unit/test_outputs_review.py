"""The run's output models with ``method=dec_lora``: ``clients/client_<c>/`` loads as a plain Hugging Face model, and
saving the clients does not change ``consensus/``."""

import copy

import pytest
import torch

pytest.importorskip("peft")

from deca_ds.build import prepare_model  # noqa: E402
from deca_ds.config import load_config  # noqa: E402
from deca_ds.models import load_model_and_tokenizer, save_model_dir  # noqa: E402

HEAD = "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head]"


def test_save_model_dir_writes_a_peft_model_merged_and_loadable(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = load_config(None, ["method=dec_lora", HEAD])
    model, _ = load_model_and_tokenizer(cfg.model, seed=0)
    wrapped = prepare_model(cfg, model)
    with torch.no_grad():  # non-zero adapters, so that merging changes the weights
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in wrapped.state_dict().items()}
    save_model_dir(wrapped, tmp_path / "client")
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "client", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    expected = copy.deepcopy(wrapped).merge_and_unload().state_dict()
    got = loaded.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    # The model that was saved is unchanged (the launcher averages it into the consensus model afterwards).
    after = wrapped.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_simulator_consensus_does_not_depend_on_saving_client_models(tmp_path):
    from safetensors.torch import load_file

    from deca_ds.simulate import run_simulation

    consensus = {}
    for save in ("false", "true"):
        cfg = load_config(None, ["num_clients=2", "data.num_examples=64", "data.eval_examples=2",
                                 "data.min_partition_size=4", "data.eval_generate=false", "max_steps=2",
                                 "method=dec_lora", HEAD, "simulate.stacked=false", "optim.lr=5e-2",
                                 "backend=simulate", f"model.save_client_models={save}",
                                 f"output_dir={tmp_path / save}"])
        run_simulation(cfg, save_models=True, quiet=True)
        consensus[save] = load_file(str(tmp_path / save / "consensus" / "model.safetensors"))
    a, b = consensus["false"], consensus["true"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
