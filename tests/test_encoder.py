"""The encoder: local checkpoints, safe loading, batched L2-normalisable outputs, text tower."""

from __future__ import annotations

import pickle

import pytest
import torch

from clipadapt.encoders.clip import ClipEncoder, load_state_dict_file, resolve_backbone
from clipadapt.exceptions import CheckpointError, ConfigError
from conftest import TINY_MODEL


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_payload_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"weight": _Payload()}, handle)
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_state_dict_file(path)
    assert "this must never run" not in capsys.readouterr().out


def test_weights_only_torch_checkpoint_loads(tmp_path, tiny_model_dir, tiny_encoder):
    state = {k: v.clone() for k, v in tiny_encoder.model.state_dict().items()}
    path = tmp_path / "plain.pt"
    torch.save({"state_dict": state}, path)
    encoder = ClipEncoder(resolve_backbone(TINY_MODEL, checkpoint=path), device="cpu")
    texts = ["a photo of a cat.", "a photo of a dog."]
    assert torch.equal(encoder.encode_text(texts), tiny_encoder.encode_text(texts))


def test_checkpoint_of_another_architecture_is_a_clear_error(tmp_path, tiny_model_dir):
    from safetensors.torch import save_file

    path = tmp_path / "wrong.safetensors"
    save_file({"not_a_weight": torch.zeros(3)}, str(path))
    with pytest.raises(CheckpointError, match="does not fit architecture"):
        ClipEncoder(resolve_backbone(TINY_MODEL, checkpoint=path), device="cpu")
    text = tmp_path / "notes.safetensors"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        ClipEncoder(resolve_backbone(TINY_MODEL, checkpoint=text), device="cpu")


def test_backbone_errors_name_the_fix(tiny_model_dir):
    with pytest.raises(ConfigError, match="unknown backbone architecture"):
        resolve_backbone("NoSuchNet-7")
    with pytest.raises(ConfigError, match="needs weights"):
        resolve_backbone(TINY_MODEL)
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_backbone(TINY_MODEL, checkpoint="missing.safetensors")


def test_batched_encoding_equals_one_batch(tiny_encoder):
    texts = [f"a photo of thing {i}." for i in range(7)]
    whole = tiny_encoder.encode_text(texts, batch_size=64)
    chunked = tiny_encoder.encode_text(texts, batch_size=3)
    assert torch.allclose(whole, chunked, atol=1e-5)
    normed = tiny_encoder.encode_text(texts, normalize=True)
    assert torch.allclose(normed.norm(dim=1), torch.ones(7), atol=1e-5)
    images = torch.randn(5, 3, tiny_encoder.image_size, tiny_encoder.image_size)
    assert tiny_encoder.encode_images(images).shape == (5, 32)


def test_text_tower_reproduces_encode_text(tiny_encoder):
    tower = tiny_encoder.text_tower()
    tokens = tower.tokenize(["a photo of a red square."])
    features = tower.encode_embeddings(tower.token_embedding(tokens), tokens)
    assert torch.allclose(
        features, tiny_encoder.encode_text(["a photo of a red square."]), atol=1e-5
    )
    assert not any(p.requires_grad for p in tower.parameters())
