"""Hugging Face ``transformers`` integration (the optional ``hf`` extra; tested with transformers 5.24).

After :func:`register`, a directory written by :meth:`linmix.lm.BasedForCausalLM.save_pretrained`
(config.json with ``"model_type": "linmix_based"`` + model.safetensors) loads with
``AutoModelForCausalLM.from_pretrained(directory)`` and generates with ``model.generate(...)``::

    import linmix.lm.hf
    from transformers import AutoModelForCausalLM

    linmix.lm.hf.register()
    model = AutoModelForCausalLM.from_pretrained("out/based-360m")   # a LinmixForCausalLM
    ids = model.generate(input_ids, attention_mask=mask, max_new_tokens=64)

- :class:`LinmixHFConfig` is a ``PretrainedConfig`` carrying every :class:`BasedConfig` field under
  the same name; :meth:`LinmixHFConfig.from_based_config` / :meth:`LinmixHFConfig.to_based_config`
  convert both ways. The mixer pattern lives in the attribute ``mixer_types`` (written to JSON as
  ``layer_types``, as linmix writes it): transformers validates and rewrites any attribute named
  ``layer_types`` (``"attention"`` -> ``"full_attention"``, ``"mamba"`` -> ``"linear_attention"``).
- :class:`LinmixForCausalLM` owns the very modules of a :class:`BasedForCausalLM`
  (``transformer.*``, ``lm_head``) and runs its ``forward`` / ``step``, so parameter names equal the
  safetensors keys linmix writes and outputs equal linmix's bit for bit.
- :class:`LinmixCache` (a transformers ``Cache``) holds linmix's :class:`LMState`. The first call
  (prefill) runs the parallel forward with ``return_state=True``; every later one-token call goes
  through ``BasedForCausalLM.step``, updating the state in place, so decoding keeps constant memory for
  fixed-state mixers. Left padding (``attention_mask`` zeros first) is honoured in the prefill:
  padded tokens never enter the state.

Shapes: ``input_ids [B, T]`` -> ``logits [B, T, vocab_size]``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

try:
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
    from transformers.cache_utils import Cache
    from transformers.modeling_outputs import CausalLMOutputWithPast
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "linmix.lm.hf needs Hugging Face transformers (>= 5.0); install it with `pip install 'linmix[hf]'`"
    ) from error

from linmix.lm.config import BasedConfig
from linmix.lm.model import BasedForCausalLM, LMState

MODEL_TYPE = "linmix_based"

if int(transformers.__version__.split(".")[0]) < 5:  # pragma: no cover - depends on the installed version
    raise ImportError(f"linmix.lm.hf needs transformers >= 5.0 (the Cache API it implements), found {transformers.__version__}")

# transformers renamed the cache field of model outputs (past_key_values -> cache) within 5.x.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
_BASED_FIELDS = tuple(field.name for field in dataclasses.fields(BasedConfig))


def _field_default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory()  # type: ignore[misc]


# ----------------------------------------------------------------------------------------------
# config


class LinmixHFConfig(PretrainedConfig):
    """A :class:`BasedConfig` as a transformers config (``model_type = "linmix_based"``).

    Every BasedConfig field is an attribute of the same name, except ``layer_types``, kept as
    ``mixer_types`` (see the module docstring) and written to JSON as ``layer_types``. The values are
    validated by building the BasedConfig, so a bad field raises the same error linmix raises.
    """

    model_type = MODEL_TYPE
    # Standard names some transformers utilities read.
    attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "n_layer"}

    def __init__(self, **kwargs):
        values = {}
        for field in dataclasses.fields(BasedConfig):
            values[field.name] = kwargs.pop(field.name, _field_default(field))
        if "mixer_types" in kwargs:  # the attribute name, when a config is rebuilt from its __dict__
            mixer_types = kwargs.pop("mixer_types")
            values["layer_types"] = values["layer_types"] or mixer_types
        based = BasedConfig(**values)  # validates; fills the default layer pattern
        for name in _BASED_FIELDS:
            if name != "layer_types":
                setattr(self, name, getattr(based, name))
        self.mixer_types = list(based.layer_types)
        super().__init__(**kwargs)

    @property
    def padded_vocab_size(self) -> int:
        return self.to_based_config().padded_vocab_size

    # ------------------------------------------------------------------ conversion
    @classmethod
    def from_based_config(cls, config: BasedConfig, **kwargs) -> "LinmixHFConfig":
        """The transformers config of a linmix config (``kwargs``: extra transformers attributes)."""
        if not isinstance(config, BasedConfig):
            raise TypeError(f"config must be a linmix BasedConfig, got {type(config).__name__}")
        return cls(**dataclasses.asdict(config), **kwargs)

    def to_based_config(self) -> BasedConfig:
        """The linmix config (transformers-only attributes are dropped)."""
        values = {name: getattr(self, name) for name in _BASED_FIELDS if name != "layer_types"}
        return BasedConfig(layer_types=list(self.mixer_types), **values)

    # ------------------------------------------------------------------ json
    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output["layer_types"] = output.pop("mixer_types")
        return output


# ----------------------------------------------------------------------------------------------
# cache


def _map_state_tensors(state: LMState, function) -> None:
    """Apply ``function`` to every batch-first tensor of every layer state, in place of the old one."""
    for layer_state in state.layers:
        for field in dataclasses.fields(layer_state):
            value = getattr(layer_state, field.name)
            if isinstance(value, torch.Tensor):
                setattr(layer_state, field.name, function(value))


class LinmixCache(Cache):
    """Recurrent decode state of a :class:`LinmixForCausalLM` for ``generate`` (a transformers Cache).

    ``state`` is linmix's :class:`LMState` (one state per layer) or ``None`` before the prefill.
    Its size is fixed for BASED / linear attention / sliding window / BaseConv / Mamba / RWKV layers
    (``nbytes()`` is the same after 8 or 8000 tokens); only global attention layers grow.
    ``get_seq_length()`` counts the tokens consumed so far, left padding included.
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, state: LMState | None = None):
        # The layer list stays empty: the per-layer states live in ``state`` and every Cache method
        # generate uses is overridden below.
        super().__init__(layers=[])
        if state is not None and not isinstance(state, LMState):
            raise TypeError(f"state must be a linmix LMState or None, got {type(state).__name__}")
        self.state = state

    def __repr__(self) -> str:
        if self.state is None:
            return f"{type(self).__name__}(empty)"
        return f"{type(self).__name__}(layers={len(self.state.layers)}, seen={self.state.seen}, nbytes={self.nbytes()})"

    def __len__(self) -> int:
        return 0 if self.state is None else len(self.state.layers)

    def nbytes(self) -> int:
        """Bytes held by the state tensors (0 before the prefill)."""
        return 0 if self.state is None else self.state.nbytes()

    # -- what transformers' generate reads
    @property
    def is_linear(self) -> list[bool]:
        # "not all linear" tells generate to slice already-consumed tokens off a prompt that
        # continues this cache (it feeds input_ids[:, get_seq_length():]).
        return [False]

    @property
    def is_sliding(self) -> list[bool]:
        return [False]

    @property
    def is_dummy(self) -> list[bool]:
        return [False]

    @property
    def is_initialized(self) -> bool:
        return self.state is not None

    @property
    def batch_size(self) -> int:
        if self.state is None:
            return -1
        for layer_state in self.state.layers:
            for tensor in layer_state.tensors():
                return tensor.shape[0]
        return -1

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.state is None else self.state.seen

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return query_length, 0

    def has_previous_state(self, layer_idx: int | None = None, state_idx: int | None = None) -> bool:
        return self.state is not None

    # -- batch bookkeeping (beam search, num_return_sequences on a continued cache)
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.state is not None:
            _map_state_tensors(self.state, lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.state is not None:
            _map_state_tensors(self.state, lambda t: t[indices.to(t.device)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is not None:
            _map_state_tensors(self.state, lambda t: t.repeat_interleave(repeats, dim=0))

    def reset(self) -> None:
        self.state = None

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a recurrent linmix state cannot be rolled back (crop); keep a clone() instead")

    def activate_past_recording(self) -> None:
        raise NotImplementedError("a recurrent linmix state cannot record its past (needed by assisted decoding)")

    def update(self, *args, **kwargs):
        raise NotImplementedError("LinmixCache holds a linmix LMState; it has no key/value update")

    def clone(self) -> "LinmixCache":
        return LinmixCache(None if self.state is None else self.state.clone())


# ----------------------------------------------------------------------------------------------
# model


class LinmixForCausalLM(PreTrainedModel, GenerationMixin):
    """A linmix :class:`BasedForCausalLM` as a transformers causal LM.

    The module tree is the linmix model's (``transformer.embeddings.word_embeddings``,
    ``transformer.layers.{i}``, ``transformer.ln_f``, ``lm_head``, tied to the embedding when
    ``tie_word_embeddings``), so linmix's model.safetensors loads key for key.
    ``forward(input_ids [B, T], attention_mask=None, cache=None, labels=None, use_cache=None,
    return_dict=None)`` returns ``CausalLMOutputWithPast(loss, logits [B, T, V], cache)``.
    """

    config_class = LinmixHFConfig
    base_model_prefix = "transformer"
    main_input_name = "input_ids"
    _tied_weights_keys = {"lm_head.weight": "transformer.embeddings.word_embeddings.weight"}
    _no_split_modules = ["Block"]
    _is_stateful = True  # no assisted decoding: a recurrent state cannot be rolled back
    supports_gradient_checkpointing = False

    def __init__(self, config: LinmixHFConfig):
        super().__init__(config)
        linmix = BasedForCausalLM(config.to_based_config())
        self.transformer = linmix.transformer
        self.lm_head = linmix.lm_head
        # Held outside the module tree (no "linmix." key prefix); it owns the same submodules.
        object.__setattr__(self, "_linmix", linmix)
        self.post_init()

    @property
    def linmix_model(self) -> BasedForCausalLM:
        """The linmix model sharing this model's modules (and so its weights)."""
        linmix = self._linmix
        # transformers may swap a submodule (quantization, resize, set_output_embeddings): follow it.
        if linmix.transformer is not self.transformer:
            linmix.transformer = self.transformer
        if linmix.lm_head is not self.lm_head:
            linmix.lm_head = self.lm_head
        linmix.training = self.training
        return linmix

    @classmethod
    def from_linmix(cls, model: BasedForCausalLM) -> "LinmixForCausalLM":
        """Wrap an existing linmix model (its modules are shared, not copied)."""
        if not isinstance(model, BasedForCausalLM):
            raise TypeError(f"model must be a linmix BasedForCausalLM, got {type(model).__name__}")
        with torch.device("meta"):  # the placeholder modules are replaced at once: allocate nothing
            wrapper = cls(LinmixHFConfig.from_based_config(model.config))
        wrapper.transformer = model.transformer
        wrapper.lm_head = model.lm_head
        object.__setattr__(wrapper, "_linmix", model)
        return wrapper.train(model.training)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' ``from_pretrained``, strict: every parameter must come from the checkpoint."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        problems = {key: sorted(info.get(key) or []) for key in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        if any(problems.values()):
            details = ", ".join(f"{key} {value[:8]}" for key, value in problems.items() if value)
            raise ValueError(f"the checkpoint does not match the linmix config: {details}")
        return (model, info) if want_info else model

    def _init_weights(self, module: nn.Module) -> None:
        # linmix modules initialise themselves in their constructors (BasedForCausalLM.reset_parameters
        # and the mixers' own schemes); transformers' generic init would overwrite those, and a
        # checkpoint must provide every tensor (see from_pretrained).
        pass

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.embeddings.word_embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def train(self, mode: bool = True) -> "LinmixForCausalLM":
        super().train(mode)
        self._linmix.training = mode
        return self

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate must not build a key/value DynamicCache: forward creates a LinmixCache in the prefill.
        return False

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: LinmixCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ):
        """input_ids [B, T] -> logits [B, T, vocab_size] (+ shifted cross-entropy with ``labels``,
        label -100 ignored, exactly linmix's loss).

        ``attention_mask [B, T_total]``: 1 = real token, left padding only; with a cache holding
        ``seen`` tokens, its last ``T`` columns belong to ``input_ids``. ``cache``: a
        :class:`LinmixCache`; an empty one (or ``use_cache=True``) is filled by the parallel
        forward; a filled one is continued (one token: the recurrent ``step``; several tokens: the
        parallel forward from the state). ``logits_to_keep = n > 0`` keeps the last n positions'
        logits only (generate passes 1 for the prefill). ``position_ids`` and other generate bookkeeping kwargs
        are accepted and ignored: positions come from the state.
        """
        for alias in ("past_key_values", "cache_params"):
            if kwargs.get(alias) is not None:
                if cache is not None:
                    raise ValueError(f"pass the cache once, as `cache` (got both `cache` and `{alias}`)")
                cache = kwargs.pop(alias)
        if inputs_embeds is not None:
            raise ValueError("LinmixForCausalLM takes input_ids only (inputs_embeds is not supported)")
        if input_ids is None:
            raise ValueError("input_ids [B, T] is required")
        if output_attentions or output_hidden_states:
            raise ValueError("LinmixForCausalLM returns no attentions or hidden states "
                             "(output_attentions / output_hidden_states must be False)")
        if cache is not None and not isinstance(cache, LinmixCache):
            raise TypeError(f"cache must be a LinmixCache (the model's recurrent state), got {type(cache).__name__}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape [B, T], got {tuple(input_ids.shape)}")
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if use_cache is None:
            use_cache = cache is not None or bool(getattr(self.config, "use_cache", False))
        linmix = self.linmix_model
        length = input_ids.shape[1]
        state = cache.state if cache is not None else None

        mask = attention_mask
        if mask is not None:
            if mask.dim() != 2 or mask.shape[0] != input_ids.shape[0] or mask.shape[1] < length:
                raise ValueError(f"attention_mask must have shape [B, >= T] for input_ids {tuple(input_ids.shape)}, "
                                 f"got {tuple(mask.shape)}")
            mask = mask[:, -length:]
            if bool(mask.all()):
                mask = None  # nothing padded: take the unmasked path

        loss = None
        if state is not None and length == 1 and labels is None:
            if mask is not None:
                raise ValueError("attention_mask marks the new token as padding; a cached (decode) step "
                                 "only takes real tokens (pad on the left, before the prompt)")
            logits, state = linmix.step(input_ids[:, 0], state)
            logits = logits[:, None]
        else:
            keep = 0 if labels is not None or not isinstance(logits_to_keep, int) else logits_to_keep
            out = linmix(input_ids, attention_mask=mask, labels=labels, state=state, return_state=use_cache,
                         logits_to_keep=keep)
            logits, loss, state = out.logits, out.loss, out.state

        if use_cache:
            cache = cache if cache is not None else LinmixCache()
            cache.state = state
        else:
            cache = None
        output = CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})
        return output if return_dict else output.to_tuple()


# ----------------------------------------------------------------------------------------------
# registration


def register() -> None:
    """Make ``AutoConfig`` / ``AutoModelForCausalLM`` resolve ``"model_type": "linmix_based"``
    (idempotent)."""
    AutoConfig.register(MODEL_TYPE, LinmixHFConfig, exist_ok=True)
    AutoModelForCausalLM.register(LinmixHFConfig, LinmixForCausalLM, exist_ok=True)


__all__ = ["LinmixCache", "LinmixForCausalLM", "LinmixHFConfig", "register"]
