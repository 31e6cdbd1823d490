"""The anatomy on every MoE family of the installed transformers, enumerated from its config registry.

A model type counts as MoE when its default config (or, for a multimodal wrapper, its ``text_config``)
has more than one expert, or when it has a row in :data:`MOE_FAMILIES`. Wrappers are checked through
their text sub-config type, so a family added by a transformers upgrade is picked up without editing
this file; one that cannot be built tiny on CPU goes into :data:`SKIP` with its reason.

Each family is first built on the meta device to count its parameters (no memory), then built for real
from :func:`hf_moe_tuning.models.tiny_config`, described, and run forward once with hooks on its routers.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import pytest
import torch
from transformers import CONFIG_MAPPING, PretrainedConfig
from transformers.utils import logging as hf_logging

from hf_moe_tuning.anatomy import (
    MOE_FAMILIES,
    MoEAnatomy,
    ParamGroup,
    UnsupportedMoEFamilyError,
    describe_moe,
    get_family,
)
from hf_moe_tuning.callbacks.expert_load import probe_inputs
from hf_moe_tuning.models import build_from_config, build_tiny_model, tiny_config
from hf_moe_tuning.routing.capture import RouterCapture

#: Config attributes holding the number of routed experts.
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
#: Sub-configs of multimodal wrappers whose model type is checked instead of the wrapper's.
TEXT_SUBCONFIGS = ("text_config", "language_config")
#: A tiny build above this many parameters means the generic shrink missed a size attribute.
MAX_TINY_PARAMS = 20_000_000

#: Families that are enumerated but cannot be checked, each with its reason.
SKIP: dict[str, str] = {
    "longcat_flash": (
        "unsupported by design (describe_moe raises UnsupportedMoEFamilyError): LongcatFlashExperts gives "
        "gate_up_proj n_routed_experts + zero_expert_num rows but down_proj n_routed_experts rows, so the "
        "fused tensors share no expert axis, and the router applies classifier.weight with F.linear"
    ),
}

#: Registry types never built here, not even on the meta device, with the reason. They are still
#: covered through their text sub-config type when they have one.
NEVER_BUILD: dict[str, str] = {
    "step3p7": "multimodal wrapper whose tiny build still takes ~20 GB (the process gets OOM-killed); "
    "its text model is checked as step3p5",
}

#: Families whose text model takes ``inputs_embeds`` rather than ``input_ids``.
EMBEDS_INPUT = {"qwen3_omni_moe_talker_text"}

#: Families the issue names explicitly; the registry scan must find each of them.
REQUIRED = {
    "switch_transformers", "nllb-moe", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2",
    "deepseek_v3", "gpt_oss", "granitemoe", "jetmoe", "phimoe", "llama4_text", "glm4_moe", "minimax",
    "ernie4_5_moe", "hunyuan_v1_moe", "dots1", "dbrx",
}  # fmt: skip


def _expert_count(config: PretrainedConfig) -> int:
    for key in EXPERT_COUNT_KEYS:
        try:
            value = getattr(config, key, None)
        except Exception:
            continue
        if isinstance(value, int) and not isinstance(value, bool) and value > 1:
            return value
    return 0


def _may_be_moe(config_class: type[PretrainedConfig]) -> bool:
    """Cheap pre-filter: the class declares an expert count or a text sub-config (else no instance needed)."""
    if not dataclasses.is_dataclass(config_class):
        return True
    fields = {f.name for f in dataclasses.fields(config_class)}
    return bool(fields & set(EXPERT_COUNT_KEYS)) or any(a in (config_class.sub_configs or {}) for a in TEXT_SUBCONFIGS)


@functools.cache
def moe_model_types() -> dict[str, str]:
    """``{model_type to check: registry type it was found through}`` for every MoE family."""
    hf_logging.set_verbosity_error()  # default configs of unrelated families warn about token ids
    found: dict[str, str] = {}
    for model_type in sorted(CONFIG_MAPPING.keys()):
        if not _may_be_moe(CONFIG_MAPPING[model_type]) and model_type not in MOE_FAMILIES:
            continue
        try:
            config = CONFIG_MAPPING[model_type]()
        except Exception:
            continue
        text_type = None
        for attr in TEXT_SUBCONFIGS:
            sub = getattr(config, attr, None)
            if isinstance(sub, PretrainedConfig) and sub.model_type in CONFIG_MAPPING:
                text_type = sub.model_type if _expert_count(sub) else None
                break
        if text_type is not None:
            found.setdefault(text_type, model_type)
        elif _expert_count(config) or model_type in MOE_FAMILIES:
            found.setdefault(model_type, model_type)
    return found


#: config attribute holding the router's input width where it is not the hidden size (Zaya's router is an MLP
#: on a router_hidden_size stream)
ROUTER_INPUT_WIDTH = {"zaya": "router_hidden_size"}


def _hidden_size(config: PretrainedConfig) -> int:
    for key in ("hidden_size", "d_model"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    raise AssertionError(f"{config.model_type}: no hidden size in config")


def _meta_param_count(config: PretrainedConfig) -> int:
    with torch.device("meta"):
        model = build_from_config(config)
    return sum(p.numel() for p in model.parameters())


@functools.cache
def _built(model_type: str):
    """Tiny model of ``model_type`` (guarded by a meta-device size check) and its anatomy."""
    config = tiny_config(model_type)
    n = _meta_param_count(config)
    assert n <= MAX_TINY_PARAMS, (
        f"tiny {model_type} has {n:,} parameters: add the attribute that keeps it big to "
        "hf_moe_tuning.models._SHRINK/_FAMILY_SHRINK, or a SKIP entry with the reason"
    )
    model = build_from_config(config).eval()
    return model, describe_moe(model)


def _expected_router_rows(model_type: str, num_experts: int, config: PretrainedConfig) -> int:
    family = get_family(model_type)
    if family.scoring == "product_key":
        return 2 * math.isqrt(num_experts)
    extra = family.router_extra_rows
    return num_experts + (getattr(config, extra) if isinstance(extra, str) else extra)


def _text_inputs(model, model_type: str, seed: int) -> dict:
    """A [2, 8] text batch for one forward of ``model`` (embeddings where the family takes no ids)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (2, 8), generator=generator)
    inputs: dict = {"use_cache": False}
    if model_type in EMBEDS_INPUT:
        embed = model.get_input_embeddings()
        inputs["inputs_embeds"] = (
            embed(ids) if embed is not None else torch.randn(2, 8, _hidden_size(model.config), generator=generator)
        )
    else:
        inputs["input_ids"] = ids
    if model.config.is_encoder_decoder:
        inputs["decoder_input_ids"] = ids
    return inputs


FAMILIES = moe_model_types()
CHECKED = sorted(t for t in FAMILIES if t not in SKIP)


def test_registry_scan_finds_the_known_families():
    assert REQUIRED <= set(FAMILIES), sorted(REQUIRED - set(FAMILIES))
    assert not {"t5", "llama", "bert"} & set(FAMILIES)
    # wrappers are checked through their text model type
    assert FAMILIES.get("step3p5") in ("step3p5", "step3p7")
    assert "llama4_text" in FAMILIES and "llama4" not in FAMILIES


def test_skip_list_names_enumerated_families_with_reasons():
    assert set(SKIP) <= set(FAMILIES), "stale SKIP entries: " + str(sorted(set(SKIP) - set(FAMILIES)))
    assert all(len(reason) > 20 for reason in {**SKIP, **NEVER_BUILD}.values())
    assert not set(NEVER_BUILD) & set(FAMILIES), "a NEVER_BUILD type would be built by the family check"


@pytest.mark.parametrize("model_type", sorted(SKIP))
def test_skipped_family_still_fails(model_type):
    """A family stays in SKIP only while it really fails (cheap to build, so we try)."""
    with pytest.raises(UnsupportedMoEFamilyError, match=model_type):
        _built(model_type)


@pytest.mark.parametrize("model_type", CHECKED)
def test_family_anatomy(model_type):
    model, anatomy = _built(model_type)
    config = model.config
    assert isinstance(anatomy, MoEAnatomy)
    assert anatomy.layers, f"{model_type}: no MoE layer detected"

    names = {n for n, _ in model.named_parameters()}
    assert set(anatomy.groups) == names  # every parameter in exactly one group (a dict has one value per name)
    counts = anatomy.group_counts()
    assert counts[ParamGroup.ROUTER] > 0 and counts[ParamGroup.EXPERTS] > 0
    assert sum(counts.values()) == anatomy.total_params == sum(p.numel() for p in model.parameters())

    inside = tuple(layer.path + "." for layer in anatomy.layers)
    stray = [n for n in anatomy.params_in(ParamGroup.ROUTER, ParamGroup.EXPERTS) if not n.startswith(inside)]
    assert not stray, f"router/expert parameters outside every MoE layer: {stray[:5]}"

    family = get_family(model_type)
    router_in = getattr(config, ROUTER_INPUT_WIDTH[model_type]) if model_type in ROUTER_INPUT_WIDTH else _hidden_size(config)
    for layer in anatomy.layers:
        assert layer.num_experts >= 2 and 1 <= layer.top_k <= layer.num_experts, layer
        weight = model.get_parameter(layer.router_weight)
        rows = _expected_router_rows(model_type, layer.num_experts, config)
        assert layer.router_outputs == rows
        assert tuple(weight.shape) == (rows, router_in), (layer.router_weight, tuple(weight.shape))
        assert anatomy.groups[layer.router_weight] is ParamGroup.ROUTER
        if layer.router_bias is not None:
            assert tuple(model.get_parameter(layer.router_bias).shape) == (rows,)
            assert anatomy.groups[layer.router_bias] is ParamGroup.ROUTER

        assert layer.fused_experts or layer.per_expert
        for name, axis in layer.fused_experts.items():
            size = model.get_parameter(name).shape[axis]
            if family.expert_blocks:
                assert size % layer.num_experts == 0 and size > layer.num_experts, (name, size)
            else:
                assert size == layer.num_experts, (name, size)
            assert anatomy.groups[name] is ParamGroup.EXPERTS
        if layer.per_expert:
            assert set(layer.per_expert.values()) == set(range(layer.num_experts))
            assert all(anatomy.groups[n] is ParamGroup.EXPERTS for n in layer.per_expert)
        for path in layer.shared_paths:
            shared = [n for n in names if n.startswith(path + ".")]
            assert shared and all(anatomy.groups[n] is ParamGroup.SHARED_EXPERTS for n in shared), path


@pytest.mark.parametrize("model_type", CHECKED)
def test_family_router_hooks_fire(model_type):
    """One forward pass: every router module (where RouterCapture hooks) is called, with [.., rows] logits."""
    model, anatomy = _built(model_type)
    fired: dict[str, int] = {}

    def hook(module, args, output, path):
        fired[path] = fired.get(path, 0) + 1

    handles = [
        model.get_submodule(layer.router_path).register_forward_hook(functools.partial(hook, path=layer.router_path))
        for layer in anatomy.layers
    ]
    try:
        with torch.no_grad():
            model(**_text_inputs(model, model_type, seed=0))
    finally:
        for handle in handles:
            handle.remove()
    # modality experts (e.g. ERNIE-VL's vision_moe) see no tokens from text-only input
    text_layers = [layer.router_path for layer in anatomy.layers if "vision" not in layer.path]
    assert text_layers and all(fired.get(p) for p in text_layers), sorted(set(text_layers) - set(fired))


@pytest.mark.parametrize("name", ["t5", "llama"])
def test_dense_models_have_no_moe_layers(name):
    anatomy = describe_moe(build_tiny_model(name))
    assert anatomy.layers == []
    assert not anatomy.params_in(ParamGroup.ROUTER, ParamGroup.EXPERTS, ParamGroup.SHARED_EXPERTS)
    assert anatomy.params_in(ParamGroup.DENSE_FFN) and anatomy.params_in(ParamGroup.ATTENTION)


def _experts_module_path(layer) -> str | None:
    """Path of the experts module of ``layer``: the one holding its fused expert tensors, or the deepest
    module holding all of its per-expert parameters."""
    name = next(iter(layer.fused_experts), None)
    if name:
        return name.rpartition(".")[0]
    names = [n.split(".") for n in layer.per_expert]
    if not names:
        return None
    common = []
    for parts in zip(*names):
        if len(set(parts)) > 1:
            break
        common.append(parts[0])
    return ".".join(common) or None


@pytest.mark.parametrize("model_type", CHECKED)
def test_family_expert_load_counts_what_the_experts_receive(model_type):
    """ExpertLoadCallback's counts equal the top-k indices the fused experts module is called with.

    The witness is independent of the router capture: a forward pre-hook on the experts module reads the
    integer ``[tokens, k]`` argument the MoE block passes to it (Switch passes a one-hot dispatch mask
    with dropped tokens zeroed; those are compared on the kept tokens). Families whose experts are
    called without such an argument are not compared here.
    """
    from hf_moe_tuning.callbacks.expert_load import TRAIN, ExpertLoadCallback

    model, anatomy = _built(model_type)
    witnessed: dict[int, torch.Tensor] = {}

    def pre_hook(module, args, layer):
        ints = [a for a in args if isinstance(a, torch.Tensor) and not a.is_floating_point()]
        if not ints:
            return
        chosen = ints[0]
        if chosen.shape[-1] == layer.num_experts and layer.top_k == 1:  # one-hot dispatch (Switch)
            chosen = chosen.reshape(-1, layer.num_experts)
            kept = chosen.sum(-1) > 0
            witnessed[layer.index] = torch.bincount(chosen.argmax(-1)[kept], minlength=layer.num_experts)
        elif chosen.shape[-1] == layer.top_k:
            witnessed[layer.index] = torch.bincount(chosen.reshape(-1), minlength=layer.num_experts)

    handles = []
    for layer in anatomy.layers:
        path = _experts_module_path(layer)
        if path:
            handles.append(
                model.get_submodule(path).register_forward_pre_hook(functools.partial(pre_hook, layer=layer))
            )
    callback = ExpertLoadCallback(probe_size=0, write_jsonl=False, write_heatmap=False, tensorboard=False)
    callback.bind(model)
    try:
        with torch.no_grad():
            model(**_text_inputs(model, model_type, seed=1))
        callback._consume(TRAIN)
        loads = {load.index: load for load in callback._counters[TRAIN].reduce()}
    finally:
        callback.close()
        for handle in handles:
            handle.remove()
    if not witnessed:
        pytest.skip(f"{model_type}: the experts module is called without an integer top-k argument")
    product_key = {layer.index for layer in anatomy.layers if layer.scoring == "product_key"}
    assert not product_key & set(loads), "product-key layers are not counted (no per-expert router logits)"
    for index, want in witnessed.items():
        if index in product_key:
            continue
        load = loads[index]
        got = torch.tensor(load.counts)
        if load.dropped is not None:
            got = got - torch.tensor(load.dropped)
        assert got.tolist() == want.tolist(), (model_type, index)


@pytest.mark.parametrize("model_type", CHECKED)
def test_family_captured_logits_are_the_router_logits(model_type):
    """RouterCapture's logits (reused from the router's output where the family table's ``router_raw_logits``
    says so, recomputed elsewhere) equal ``F.linear(x, W) (+ b)`` of the router's input, after the whole forward
    (so nothing the model does later changes them), for every family (issue 18, hot path 2)."""
    import torch.nn.functional as F

    from hf_moe_tuning.routing.capture import RouterCapture

    model, anatomy = _built(model_type)
    inputs: dict[int, torch.Tensor] = {}

    def hook(module, args, output, layer):
        inputs[layer.index] = args[0].detach().reshape(-1, args[0].shape[-1]).clone()

    handles = [
        model.get_submodule(layer.router_path).register_forward_hook(functools.partial(hook, layer=layer))
        for layer in anatomy.layers
        if layer.scoring != "product_key"
    ]
    capture = RouterCapture.acquire(model, anatomy)
    try:
        with torch.no_grad():
            model(**_text_inputs(model, model_type, seed=2))
        captured = dict(capture.logits)
    finally:
        capture.release()
        for handle in handles:
            handle.remove()
    assert captured or all(layer.scoring == "product_key" for layer in anatomy.layers)
    assert set(captured) == set(inputs)
    for layer in anatomy.layers:
        if layer.index not in captured:
            continue
        weight = model.get_parameter(layer.router_weight).float()
        bias = model.get_parameter(layer.router_bias).float() if layer.router_bias else None
        want = F.linear(inputs[layer.index].float(), weight, bias)[:, : layer.num_experts]
        got = captured[layer.index]
        assert got.dtype == torch.float32 and got.shape == want.shape, (model_type, layer.index, got.shape)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, equal_nan=True,
                                   msg=lambda m, i=layer.index: f"{model_type} layer {i}: {m}")


@pytest.mark.parametrize("model_type", CHECKED)
def test_drift_probe_inputs_route_as_a_forward_with_labels(model_type):
    """The expert-load drift probe leaves the labels out of its forward (no loss; a causal LM keeps only the last
    position's logits): every family still routes every token as in a forward with the labels."""
    model, anatomy = _built(model_type)
    inputs = _text_inputs(model, model_type, seed=2)
    labels = (inputs["decoder_input_ids"] if model.config.is_encoder_decoder else inputs.get("input_ids"))
    if labels is None:
        labels = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(2))
    labels = labels.clone()
    labels[:, :2] = -100
    batch = {**inputs, "labels": labels}
    capture = RouterCapture.acquire(model)
    try:
        with torch.no_grad():
            model(**batch)
        want = {index: logits.clone() for index, logits in capture.logits.items()}
        probe, kept = probe_inputs(model, batch)
        with torch.no_grad():
            model(**probe)
        got = dict(capture.logits)
    finally:
        capture.release()
    assert "labels" not in probe and kept is labels
    assert want.keys() == got.keys()
    assert want or all(layer.scoring == "product_key" for layer in anatomy.layers)  # those capture no logits
    for index, logits in want.items():
        torch.testing.assert_close(got[index], logits)
