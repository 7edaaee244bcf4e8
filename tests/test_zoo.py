"""The model zoo: convert real timm and Hugging Face architectures (random weights, tiny sizes).

One table of cases and one test body (PEFT style). For every case:

* keep 1.0: the converted model reproduces the original model's main output
  (logits / last_hidden_state) up to float rounding;
* keep 0.5: at least one layer is converted and the forward pass gives finite outputs.

Nothing is downloaded: timm models are built with ``pretrained=False``, Hugging Face models
from tiny configs. Heavier cases are marked ``slow`` (run in CI; skip locally with
``-m "not slow"``).
"""
from __future__ import annotations

import copy
import inspect
from typing import Any

import pytest
import torch
from torch import nn

import midl_convert as mc
from midl_convert.models import hf_example_inputs

SLOW = pytest.mark.slow
# ScaledStdConv2d / StdConv2d subclass nn.Conv2d but standardise the weight in forward; the
# graph pass takes them for plain 1x1 convs and MID-L drops the standardisation (see report).
# Tiny text-transformer sizes shared by the Hugging Face cases.
TXT = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
           max_position_embeddings=64)
DEC = dict(TXT, num_key_value_heads=2)
S2S = dict(vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
           decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
           pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
VIS = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8)


def timm_case(name: str, size: int = 64, marks=(), **kwargs: Any):
    return pytest.param("timm", name, kwargs, size, marks=marks, id=f"timm-{name}")


def hf_case(cls: str, model_type: str, marks=(), **config: Any):
    return pytest.param("hf", cls, dict(config, model_type=model_type), None, marks=marks, id=f"hf-{model_type}")


# (source, name, kwargs, image size): timm kwargs go to timm.create_model; HF kwargs build the config.
ZOO = [
    # ----- timm: CNNs ------------------------------------------------------------------------
    timm_case("resnet10t"),
    timm_case("resnet18d"),
    timm_case("resnext26ts", marks=SLOW),
    timm_case("regnetx_002"),
    timm_case("regnety_002", marks=SLOW),
    timm_case("efficientnet_b0", marks=SLOW),
    timm_case("tinynet_e"),
    timm_case("mobilenetv3_small_050"),
    timm_case("mobilenetv4_conv_small", marks=SLOW),
    timm_case("mnasnet_small", marks=SLOW),
    timm_case("lcnet_050"),
    timm_case("ghostnet_050"),
    timm_case("rexnet_100", marks=SLOW),
    timm_case("densenet121", marks=SLOW),
    timm_case("dla34", marks=SLOW),
    timm_case("dpn48b", marks=SLOW),
    timm_case("hrnet_w18_small", marks=SLOW),
    timm_case("ese_vovnet19b_slim_dw", marks=SLOW),
    timm_case("darknet17"),
    timm_case("cs3darknet_focus_s", marks=SLOW),
    timm_case("repvgg_a0", marks=SLOW),
    timm_case("mobileone_s0", marks=SLOW),
    timm_case("repvit_m0_9", marks=SLOW),
    timm_case("hgnetv2_b0"),
    timm_case("resnest14d", marks=SLOW),
    timm_case("skresnet18", marks=SLOW),
    timm_case("selecsls42b", marks=SLOW),
    timm_case("nfnet_l0", marks=SLOW),  # weight-standardised convs stay dense; its plain 1x1 convs convert
    timm_case("nf_regnet_b1", marks=SLOW),
    # ----- timm: ConvNeXt-like / MetaFormers ------------------------------------------------
    timm_case("convnext_atto"),
    timm_case("inception_next_atto", marks=SLOW),
    timm_case("poolformer_s12", marks=SLOW),
    timm_case("mambaout_femto", marks=SLOW),
    timm_case("starnet_s050"),
    timm_case("edgenext_xx_small"),
    timm_case("fastvit_t8", marks=SLOW),
    timm_case("efficientformer_l1", size=224, marks=SLOW),  # attention biases fixed to 7x7 at 224
    timm_case("efficientformerv2_s0", img_size=64, marks=SLOW),
    timm_case("efficientvit_b0"),
    timm_case("efficientvit_m0", img_size=64, marks=SLOW),
    timm_case("mobilevit_xxs"),
    timm_case("focalnet_tiny_srf", marks=SLOW),
    # ----- timm: vision transformers --------------------------------------------------------
    timm_case("vit_tiny_patch16_224", img_size=64),
    timm_case("deit_tiny_distilled_patch16_224", img_size=64),
    timm_case("beit_base_patch16_224", img_size=64, depth=2),
    timm_case("eva02_tiny_patch14_224", size=56, img_size=56, marks=SLOW),
    timm_case("cait_xxs24_224", img_size=64, depth=2),
    timm_case("xcit_nano_12_p16_224", img_size=64, depth=2),
    timm_case("convit_tiny", img_size=64, depth=2),
    timm_case("pit_ti_224", img_size=64),
    timm_case("crossvit_tiny_240", size=240, marks=SLOW),
    timm_case("levit_128s", img_size=64),
    timm_case("swin_tiny_patch4_window7_224", img_size=64, window_size=2, depths=(1, 1, 1, 1)),
    timm_case("pvt_v2_b0"),
    timm_case("twins_svt_small", marks=SLOW),
    timm_case("coat_lite_tiny", img_size=64, marks=SLOW),
    timm_case("maxvit_pico_rw_256", img_size=64, marks=SLOW),
    timm_case("coatnet_nano_rw_224", img_size=64, marks=SLOW),
    timm_case("gcvit_xxtiny", img_size=64, marks=SLOW),
    timm_case("davit_tiny", depths=(1, 1, 1, 1), marks=SLOW),
    timm_case("mvitv2_tiny", img_size=64, marks=SLOW),
    timm_case("volo_d1_224", img_size=64, marks=SLOW),
    timm_case("hiera_tiny_224", img_size=64, marks=SLOW),
    # ----- timm: MLPs -----------------------------------------------------------------------
    timm_case("mixer_s32_224", img_size=64, marks=SLOW),
    timm_case("resmlp_12_224", img_size=64, marks=SLOW),
    timm_case("gmlp_ti16_224", img_size=64),
    timm_case("sequencer2d_s", marks=SLOW),
    # ----- Hugging Face: encoders -----------------------------------------------------------
    hf_case("BertForSequenceClassification", "bert", **TXT),
    hf_case("RobertaForSequenceClassification", "roberta", **TXT, pad_token_id=1),
    hf_case("DistilBertForSequenceClassification", "distilbert", vocab_size=128, dim=32, n_layers=2, n_heads=4,
            hidden_dim=64, max_position_embeddings=64),
    hf_case("AlbertForSequenceClassification", "albert", **TXT, embedding_size=16),
    hf_case("ElectraForSequenceClassification", "electra", **TXT, embedding_size=16),
    hf_case("DebertaV2ForSequenceClassification", "deberta-v2", **TXT),
    hf_case("MPNetModel", "mpnet", **TXT),
    # ----- Hugging Face: decoders (gpt2 and gpt_neox/bloom layouts: HF Conv1D, fused qkv) ----
    hf_case("GPT2LMHeadModel", "gpt2", vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64,
            bos_token_id=0, eos_token_id=0),
    hf_case("GPTNeoXForCausalLM", "gpt_neox", **TXT),
    hf_case("OPTForCausalLM", "opt", vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            ffn_dim=64, max_position_embeddings=64, word_embed_proj_dim=32),
    hf_case("BloomForCausalLM", "bloom", vocab_size=128, hidden_size=32, n_layer=2, n_head=4),
    hf_case("LlamaForCausalLM", "llama", **DEC),
    hf_case("MistralForCausalLM", "mistral", **DEC),
    hf_case("Qwen2ForCausalLM", "qwen2", **DEC),
    hf_case("PhiForCausalLM", "phi", **TXT),
    hf_case("GemmaForCausalLM", "gemma", **DEC, head_dim=8),
    # ----- Hugging Face: encoder-decoders ---------------------------------------------------
    hf_case("T5ForConditionalGeneration", "t5", vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2,
            num_heads=4),
    hf_case("BartForConditionalGeneration", "bart", **S2S),
    hf_case("WhisperForConditionalGeneration", "whisper", **S2S, num_mel_bins=16, max_source_positions=16,
            max_target_positions=32),
    # ----- Hugging Face: vision, multimodal, audio ------------------------------------------
    hf_case("ViTForImageClassification", "vit", **VIS, num_labels=10),
    hf_case("DeiTForImageClassification", "deit", **VIS, num_labels=10),
    hf_case("SwinForImageClassification", "swin", image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
            num_heads=[2, 4], window_size=4, num_labels=10),
    hf_case("ConvNextForImageClassification", "convnext", num_stages=2, hidden_sizes=[16, 32], depths=[1, 1],
            image_size=32, num_labels=10),
    hf_case("SegformerForImageClassification", "segformer", num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
            hidden_sizes=[16, 32], num_attention_heads=[1, 2], num_labels=10, image_size=32),
    hf_case("ResNetForImageClassification", "resnet", embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
            num_labels=10, image_size=32),
    hf_case("CLIPModel", "clip", projection_dim=16, text_config=dict(TXT, bos_token_id=0, eos_token_id=2),
            vision_config=VIS),
    hf_case("Wav2Vec2Model", "wav2vec2", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3),
            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4),
]


def build(source: str, name: str, kwargs: dict, size: int | None) -> tuple[nn.Module, Any]:
    """The model (random weights, eval mode) and example inputs for one case."""
    torch.manual_seed(0)
    if source == "timm":
        import timm

        model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
        inputs: Any = torch.randn(1, 3, size, size)
    else:
        import transformers

        config = transformers.AutoConfig.for_model(**kwargs)
        model = getattr(transformers, name)(config)
        inputs = example_inputs_hf(model)
    wake(model)
    return model.eval(), inputs


def example_inputs_hf(model: nn.Module) -> dict[str, torch.Tensor]:
    """``hf_example_inputs``, plus the raw-audio input it does not build (wav2vec2's ``input_values``)."""
    if "input_values" in inspect.signature(model.forward).parameters:
        return {"input_values": torch.randn(1, 800)}
    return hf_example_inputs(model)


def wake(model: nn.Module) -> None:
    """Fill all-zero parameters (zero-init heads, layer scales, residual gains) with small noise,
    so every converted layer reaches the output and the keep-1.0 comparison is not vacuous."""
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() and not p.any():
                p.normal_(0.0, 0.02)


def main_output(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "logits_per_image", "last_hidden_state"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    return out[0]


def run(model: nn.Module, inputs: Any) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(inputs, dict):
            return main_output(model(**inputs))
        return main_output(model(inputs))


@pytest.mark.parametrize("source,name,kwargs,size", ZOO)
def test_zoo_conversion(source, name, kwargs, size):
    model, inputs = build(source, name, kwargs, size)
    ref = run(model, inputs)
    scale = ref.abs().max().item()
    assert torch.isfinite(ref).all() and scale > 1e-6, f"degenerate reference output (max |y| = {scale:g})"

    # keep 1.0: every neuron on the exact path, so the output is the original one.
    exact, plan = mc.convert(copy.deepcopy(model), mc.MIDLConfig(keep=1.0), inputs)
    assert plan.converted, f"nothing converted (trace: {plan.trace}, notes: {plan.notes})"
    diff = (run(exact, inputs) - ref).abs().max().item()
    assert diff <= 1e-4 * scale, f"keep=1.0 changed the output: max |diff| {diff:.3g} vs scale {scale:.3g} ({plan.trace})"

    # keep 0.5: layers really swapped, and the forward pass stays finite.
    torch.manual_seed(0)
    half, plan = mc.convert(copy.deepcopy(model), mc.MIDLConfig(keep=0.5), inputs)
    assert plan.converted and mc.midl_layers(half), f"nothing converted at keep 0.5 ({plan.trace})"
    y = run(half, inputs)
    assert y.shape == ref.shape
    assert torch.isfinite(y).all(), "keep=0.5 output has NaN or inf"
