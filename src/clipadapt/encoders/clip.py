"""open_clip wrapper: backbones by name, pretrained tag or local checkpoint; batched encoding.

A *backbone* is an open_clip architecture name plus where its weights come from: an open_clip
``pretrained`` tag (downloaded by open_clip when online), a local checkpoint file, or a model card
(JSON naming the architecture, the checkpoint beside it and its tokenizer), such as the embedded
world model. Outputs are float32; ``normalize=True`` L2-normalises them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from clipadapt._utils import sha256_file
from clipadapt.encoders.tokenizers import build_tokenizer
from clipadapt.exceptions import CheckpointError, ConfigError

log = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
WORLD_CARD = Path(__file__).resolve().parents[1] / "world" / "assets" / "world_clip.json"
WORLD_ALIASES = ("world", "clipadapt-world", "embedded")
_REGISTERED: set[str] = set()


def register_model_configs(directory: str | Path | None = None) -> None:
    """Make open_clip aware of the JSON model configs in ``directory`` (ours by default)."""
    import open_clip

    path = Path(directory) if directory is not None else MODEL_CONFIG_DIR
    key = str(path.resolve())
    if key in _REGISTERED or not path.is_dir():
        return
    open_clip.add_model_config(path)
    _REGISTERED.add(key)


@dataclass(frozen=True)
class BackboneSpec:
    """Where a backbone comes from.

    Attributes:
        model_name: open_clip architecture name (``ViT-B-32``, ``RN50``, ``clipadapt-world-rn32``).
        pretrained: open_clip weight tag (``openai``, ``laion2b_s34b_b79k``) or None.
        checkpoint: local weights file (safetensors, or a weights-only torch file) or None.
        tokenizer: a custom tokenizer description from a model card, or None for open_clip's.
        card: the model card dict when the backbone came from one.
    """

    model_name: str
    pretrained: str | None = None
    checkpoint: Path | None = None
    tokenizer: dict[str, Any] | None = None
    card: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def display_name(self) -> str:
        if self.checkpoint is not None:
            return f"{self.model_name}@{self.checkpoint.name}"
        if self.pretrained:
            return f"{self.model_name}:{self.pretrained}"
        return self.model_name

    def to_record(self) -> dict[str, Any]:
        """A JSON description from which :func:`backbone_from_record` rebuilds the spec."""
        return {
            "model_name": self.model_name,
            "pretrained": self.pretrained,
            "checkpoint": str(self.checkpoint) if self.checkpoint else None,
            "tokenizer": self.tokenizer,
            "card": self.card,
        }

    def cache_key(self) -> dict[str, Any]:
        """Everything about the backbone that changes its features."""
        return {
            "model_name": self.model_name,
            "pretrained": self.pretrained,
            "checkpoint_sha256": sha256_file(self.checkpoint) if self.checkpoint else None,
            "tokenizer": self.tokenizer,
        }


def resolve_backbone(name: str, checkpoint: str | Path | None = None) -> BackboneSpec:
    """Parse a user-typed backbone.

    Accepted forms: ``world`` (the embedded model), ``ARCH:TAG`` (open_clip pretrained tag),
    ``ARCH`` with ``checkpoint=FILE``, or the path of a model card JSON.

    Raises:
        ConfigError: unknown architecture, or a missing checkpoint / card file.
    """
    import open_clip

    register_model_configs()
    if name.strip().lower() in WORLD_ALIASES:
        if not WORLD_CARD.is_file():
            raise ConfigError(
                f"the embedded world model is missing ({WORLD_CARD.name}); reinstall clipadapt or "
                "train it with `clipadapt world pretrain`"
            )
        return backbone_from_card(WORLD_CARD)
    if name.endswith(".json"):
        return backbone_from_card(Path(name))
    model_name, _, tag = name.partition(":")
    model_name = model_name.strip()
    if model_name not in open_clip.list_models():
        raise ConfigError(
            f'unknown backbone architecture {model_name!r}; see `python -c "import open_clip; '
            "print(open_clip.list_models())\"` (examples: ViT-B-32, RN50) or use 'world'"
        )
    ckpt = None
    if checkpoint is not None:
        ckpt = Path(checkpoint)
        if not ckpt.is_file():
            raise ConfigError(f"checkpoint file {ckpt} does not exist")
    if ckpt is None and not tag:
        raise ConfigError(
            f"backbone {model_name!r} needs weights: add a pretrained tag ({model_name}:openai) "
            "or --checkpoint FILE"
        )
    return BackboneSpec(model_name, tag or None, ckpt)


def backbone_from_record(record: dict[str, Any]) -> BackboneSpec:
    """Inverse of :meth:`BackboneSpec.to_record` (as stored in bundle metadata)."""
    register_model_configs()
    checkpoint = Path(record["checkpoint"]) if record.get("checkpoint") else None
    if checkpoint is not None and not checkpoint.is_file():
        raise ConfigError(
            f"the backbone checkpoint {checkpoint} recorded with these features is gone; "
            "pass --backbone/--checkpoint explicitly"
        )
    return BackboneSpec(
        record["model_name"],
        record.get("pretrained"),
        checkpoint,
        record.get("tokenizer"),
        record.get("card") or {},
    )


def backbone_from_card(card_path: Path) -> BackboneSpec:
    """A backbone described by a model card JSON (``model_name``, ``checkpoint``, ``tokenizer``)."""
    if not card_path.is_file():
        raise ConfigError(f"model card {card_path} does not exist")
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
        model_name = card["model_name"]
        checkpoint = card_path.parent / card["checkpoint"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ConfigError(f"{card_path}: not a model card ({error})") from None
    if not checkpoint.is_file():
        raise ConfigError(f"{card_path}: its checkpoint {checkpoint.name} is missing")
    config_dir = card_path.parent / "model_configs"
    register_model_configs(config_dir if config_dir.is_dir() else None)
    return BackboneSpec(model_name, None, checkpoint, card.get("tokenizer"), card)


def select_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU.

    Raises:
        ConfigError: an unknown device name, or a device this machine does not have (CUDA
            without a GPU, ``cuda:N`` past the last GPU, MPS off Apple hardware).
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError):  # torch's message does not say what is accepted
        raise ConfigError(
            f"unknown device {str(device)!r}; pass --device auto, cpu, cuda or cuda:N"
        ) from None
    # a device that does not exist here would fail deep inside the first tensor move with
    # torch's driver message; say it once, up front
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"--device {device}: CUDA is not available on this machine (torch "
                f"{torch.__version__} finds no GPU); use --device cpu or --device auto"
            )
        count = torch.cuda.device_count()
        if chosen.index is not None and chosen.index >= count:
            raise ConfigError(
                f"--device {device}: this machine has {count} CUDA device(s) (cuda:0 to "
                f"cuda:{count - 1}); pick one of them or --device auto"
            )
    elif chosen.type == "mps" and not (
        getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    ):
        raise ConfigError(
            f"--device {device}: Apple's MPS backend is not available here; use --device cpu"
        )
    return chosen


def load_state_dict_file(path: Path) -> dict[str, Tensor]:
    """Read a weights file safely: safetensors, or a torch file with ``weights_only=True``.

    Raises:
        CheckpointError: unreadable, not a state dict, or a pickle payload that is refused.
    """
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as error:
            raise CheckpointError(
                f"{path}: not a readable safetensors checkpoint ({error})"
            ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(
            f"{path}: refused or unreadable as a weights-only checkpoint ({type(error).__name__}); "
            "clipadapt never unpickles files — convert it to safetensors or a plain state dict"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _build_tokenizer(spec: BackboneSpec) -> Any:
    import open_clip

    if spec.tokenizer is None:
        return open_clip.get_tokenizer(spec.model_name)
    # a custom tokenizer named by the model card, built by the factory registered for its type
    return build_tokenizer(spec.tokenizer, spec.checkpoint.parent if spec.checkpoint else None)


class TextTower(nn.Module):
    """The frozen text transformer of a CLIP model, callable on token embeddings (for CoOp).

    Methods:
        tokenize(texts) -> (N, L) int64 tokens.
        token_embedding(tokens) -> (N, L, W) input embeddings.
        encode_embeddings(embeddings (N, L, W), tokens (N, L)) -> (N, D) raw text features.
        used_length(tokens) -> the leading positions that decide the features.
    """

    def __init__(self, model: nn.Module, tokenizer: Any) -> None:
        super().__init__()
        needed = ("token_embedding", "positional_embedding", "transformer", "ln_final")
        if not all(hasattr(model, n) for n in needed):
            raise ConfigError(
                f"{type(model).__name__} has no built-in text transformer; prompt learning (CoOp) "
                "needs a CLIP model with one"
            )
        self.model = model
        self.tokenizer = tokenizer
        for p in model.parameters():
            p.requires_grad_(False)

    @classmethod
    def from_open_clip(cls, model: nn.Module, tokenizer: Any) -> TextTower:
        return cls(model, tokenizer)

    @property
    def width(self) -> int:
        return int(self.model.token_embedding.weight.shape[1])

    @property
    def context_length(self) -> int:
        return int(self.model.positional_embedding.shape[0])

    @property
    def device(self) -> torch.device:
        return self.model.token_embedding.weight.device

    def tokenize(self, texts: list[str]) -> Tensor:
        return self.tokenizer(texts).to(self.device)

    def token_embedding(self, tokens: Tensor) -> Tensor:
        return self.model.token_embedding(tokens)

    def used_length(self, tokens: Tensor) -> int:
        """How many leading positions of ``tokens`` (N, L) decide their features.

        A causal tower that pools at the end token never lets a later position reach it, so
        ``encode_embeddings`` of the first ``last end-token position + 1`` positions gives the
        same features as of all L, for a fraction of the work (CoOp's prompts fill a third of
        CLIP's 77 positions); a tower without a causal mask or with another pooling needs all L.
        """
        model = self.model
        mask = getattr(model, "attn_mask", None)
        pool = getattr(model, "text_pool_type", "argmax")
        length = tokens.shape[1]
        if mask is None or pool not in ("argmax", "eos") or length > mask.shape[0]:
            return length
        causal = torch.isneginf(mask[:length, :length]) == torch.ones(
            length, length, dtype=torch.bool, device=mask.device
        ).triu(1)
        if not bool(causal.all()):
            return length
        if pool == "argmax":
            ends = tokens.argmax(dim=-1)
        else:
            ends = (tokens == getattr(model, "text_eos_id", None)).int().argmax(dim=-1)
        return int(ends.max()) + 1

    def encode_embeddings(self, embeddings: Tensor, tokens: Tensor) -> Tensor:
        """(N, D) raw features of prompts given as input embeddings (N, L', W) and their tokens
        (N, L'); L' may be shorter than the context length (see :meth:`used_length`)."""
        from open_clip.transformer import text_global_pool

        model = self.model
        length = embeddings.shape[1]
        x = embeddings + model.positional_embedding[:length].to(embeddings.dtype)
        mask = model.attn_mask
        x = model.transformer(x, attn_mask=None if mask is None else mask[:length, :length])
        x = model.ln_final(x)
        x = text_global_pool(
            x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None)
        )
        if isinstance(x, tuple):  # older open_clip returns (pooled, tokens)
            x = x[0]
        projection = model.text_projection
        if projection is not None:
            x = projection(x) if isinstance(projection, nn.Linear) else x @ projection
        return x


class ClipEncoder:
    """A frozen open_clip model that turns images and texts into features.

    Args:
        backbone: a :class:`BackboneSpec` (see :func:`resolve_backbone`).
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda:0``...
        precision: ``auto`` (fp16 autocast on CUDA, fp32 on CPU), ``fp32``, ``fp16``, ``bf16``.

    Raises:
        ConfigError: weights cannot be downloaded (offline) or the architecture is unknown.
        CheckpointError: the checkpoint file is unreadable or does not fit the architecture.
    """

    def __init__(
        self, backbone: BackboneSpec, device: str | torch.device = "auto", precision: str = "auto"
    ) -> None:
        import open_clip

        register_model_configs()
        self.backbone = backbone
        self.device = select_device(device)
        try:
            # open_clip warns on the root logger that a model without a tag is random; our
            # checkpoint is loaded right after, so silence that one message.
            quiet = backbone.checkpoint is not None
            if quiet:
                logging.disable(logging.WARNING)
            try:
                model, _, preprocess = open_clip.create_model_and_transforms(
                    backbone.model_name, pretrained=backbone.pretrained, device="cpu"
                )
            finally:
                if quiet:
                    logging.disable(logging.NOTSET)
        except Exception as error:  # open_clip / huggingface_hub raise many error types
            raise ConfigError(
                f"could not load {backbone.display_name}: {error}. Offline? Pass a local "
                "checkpoint with --checkpoint FILE"
            ) from None
        if backbone.checkpoint is not None:
            state = load_state_dict_file(backbone.checkpoint)
            state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
            try:
                model.load_state_dict(state, strict=True)
            except RuntimeError as error:
                first = str(error).splitlines()[0:3]
                raise CheckpointError(
                    f"{backbone.checkpoint}: does not fit architecture {backbone.model_name} "
                    f"({' '.join(first)})"
                ) from None
        model.eval().requires_grad_(False).to(self.device)
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = _build_tokenizer(backbone)
        if precision == "auto":
            precision = "fp16" if self.device.type == "cuda" else "fp32"
        if precision not in ("fp32", "fp16", "bf16"):
            raise ConfigError(f"precision must be auto, fp32, fp16 or bf16, got {precision!r}")
        self.precision = precision
        visual = model.visual
        size = getattr(visual, "image_size", 224)
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        cfg = getattr(visual, "preprocess_cfg", {}) or {}
        # a model card describes how its weights were trained, so its statistics win
        self.mean = tuple(
            backbone.card.get("mean") or cfg.get("mean") or open_clip.OPENAI_DATASET_MEAN
        )
        self.std = tuple(backbone.card.get("std") or cfg.get("std") or open_clip.OPENAI_DATASET_STD)

    def _autocast(self) -> Any:
        if self.device.type != "cuda" or self.precision == "fp32":
            return torch.autocast(self.device.type, enabled=False)
        dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
        return torch.autocast("cuda", dtype=dtype)

    @property
    def dim(self) -> int:
        return int(self.encode_text(["a"]).shape[1])

    @torch.no_grad()
    def encode_images(self, images: Tensor, normalize: bool = False) -> Tensor:
        """(B, 3, H, W) preprocessed images -> (B, D) float32 features on the CPU."""
        with self._autocast():
            out = self.model.encode_image(images.to(self.device, non_blocking=True))
        out = out.float()
        if normalize:
            out = out / out.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return out.cpu()

    @torch.no_grad()
    def encode_text(
        self, texts: list[str], batch_size: int = 256, normalize: bool = False
    ) -> Tensor:
        """Texts -> (N, D) float32 features on the CPU, encoded in batches."""
        chunks = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(texts[start : start + batch_size]).to(self.device)
            with self._autocast():
                chunks.append(self.model.encode_text(tokens).float().cpu())
        if not chunks:
            raise ConfigError("encode_text got no texts")
        out = torch.cat(chunks)
        if normalize:
            out = out / out.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return out

    def text_tower(self) -> TextTower:
        """The frozen text tower for methods that learn prompts (CoOp)."""
        return TextTower.from_open_clip(self.model, self.tokenizer)
