"""HyperMoE checkpoints through the serving stack: saved with the model (shared hypernetwork stored once),
loaded by the engine, served with the same logits as the in-memory model; flag mismatches fail clearly."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from hypermoe import HyperMoEConfig
from serve import LLM, SamplingParams
from serve.models import MoEDecoder
from serve.models.layers import DenseCausalAttention
from serve.models.loader import load_model, read_config, save_safetensors
from tests.serve.checkpoints import hf_model, save

HYPER = HyperMoEConfig(expert_embedding_dim=16, process_dim=16, hypernet_input_dim=16, layer_embedding_dim=4,
                       bottleneck_dim=16, adapter_dim=8)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(plain Mixtral checkpoint, the same model + trained-looking HyperMoE parts, that in-memory model)."""
    plain = save(hf_model("mixtral"), tmp_path_factory.mktemp("plain"))
    hf, family, config = read_config(plain)
    base = load_model(plain)
    torch.manual_seed(1)
    model = MoEDecoder(dataclasses.replace(config, hypermoe=HYPER)).eval()
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and missing and all(".hypermoe." in k for k in missing)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".hypermoe." in name:
                p.normal_(0.0, 0.3)  # far from init, so a wrong mapping shows in the logits
    hyper_dir = tmp_path_factory.mktemp("hyper")
    (hyper_dir / "config.json").write_text(json.dumps({**hf, "hypermoe": dataclasses.asdict(HYPER)}))
    save_safetensors(model, family, hyper_dir)
    return plain, str(hyper_dir), model, base


def _logits(model, ids):
    with torch.inference_mode():
        hidden = model(torch.tensor(ids), torch.arange(len(ids)), DenseCausalAttention(1, len(ids)))
        return model.logits(hidden)


def test_hypermoe_checkpoint_round_trips_with_the_shared_hypernetwork_once(checkpoints):
    plain, hyper_dir, model, base = checkpoints
    loaded = load_model(hyper_dir)
    ids = [3, 17, 99, 4, 58, 21, 7]
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=1e-5, atol=1e-5)
    assert (_logits(loaded, ids) - _logits(base, ids)).abs().max() > 1e-2  # the adapter changes the output
    layers = [m.mlp.hypermoe for m in loaded.layers]
    assert all(h.hypernetwork is layers[0].hypernetwork for h in layers)
    assert [h.layer_index for h in layers] == list(range(len(layers)))
    from safetensors import safe_open
    with safe_open(f"{hyper_dir}/model.safetensors", framework="pt") as f:
        keys = list(f.keys())
    assert sum(k.startswith("model.hypermoe.hypernetwork.") for k in keys) == \
        len(list(layers[0].hypernetwork.parameters()))


def test_engine_serves_hypermoe_like_the_in_memory_model(checkpoints):
    _, hyper_dir, model, _ = checkpoints
    llm = LLM(hyper_dir, hypermoe=True, max_model_len=64)
    prompt = [5, 9, 33, 2, 71]
    out = llm.generate(prompt, SamplingParams(max_tokens=6, temperature=0.0))[0]
    ids = list(prompt)
    for _ in range(6):  # greedy with the in-memory model, recomputing the whole prefix each time
        ids.append(int(_logits(model, ids)[-1].argmax()))
    assert out.token_ids == ids[len(prompt):]


def test_hypermoe_flag_must_match_the_checkpoint(checkpoints):
    plain, hyper_dir, _, _ = checkpoints
    with pytest.raises(ValueError, match=r"hypermoe \(True\) but checkpoint .* is not a HyperMoE"):
        load_model(plain, hypermoe=True)
    with pytest.raises(ValueError, match=r"hypermoe \(False\) but checkpoint .* is a HyperMoE"):
        load_model(hyper_dir, hypermoe=False)
