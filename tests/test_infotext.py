"""Reading A1111 infotexts (a PNG's `parameters` text) back into a generation request.

What this file proves:
  * every Request sd15 can build survives `req.infotext()` -> `Request.from_infotext(text).request`
    unchanged (a property test over prompts with any punctuation and newlines, sizes, steps, every
    sampler and DDIM's eta, any finite CFG scale, seeds, batches; one infotext per image for prompt
    lists; img2img given its init image back);
  * infotexts written the way A1111 1.x writes them (hand-made from the documented format, not from
    sd15's writer) read as the request they describe, with every field sd15 cannot apply reported in
    `unsupported` (never dropped), and the model / version fields returned as information;
  * bad infotexts fail with a ValueError that names the problem, and text without a settings line is
    all prompt, as in A1111;
  * `parse_infotext` on its own: JSON-quoted values, key spellings, field order.

Format sources: AUTOMATIC1111/stable-diffusion-webui, `modules/processing.py` (`create_infotext`: the
layout and the quoting of values holding `,` `:` or a newline) and `modules/infotext_utils.py`
(`parse_generation_parameters`: the last line is the settings when it holds >= 3 `Key: value` pairs; the
whole text is stripped first; values are found with `re.findall`, JSON-quoted ones unquoted), and
`modules/sd_samplers.py` (pre-1.9 names such as "DPM++ 2M Karras" with no "Schedule type").
"""

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sd15.pipeline.hires import Hires
from sd15.pipeline.infotext import format_infotext, parse_infotext
from sd15.pipeline.request import DEFAULT_GUIDANCE, DEFAULT_SIZE, DEFAULT_STEPS, FromInfotext, ModelInfo, Request
from sd15.sampling.registry import SAMPLERS, every_combination

# Deterministic (the same examples on every run, no database in the tree), like test_fuzz_loader.
PROPERTY = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
NEGATIVE = "Negative prompt:"


# ---- helpers ---------------------------------------------------------------------------------------

def settings_of(req: Request) -> dict:
    """Every setting of a request as plain values: compared next to `==`, so a failure shows which
    field differs (and the check does not rest on Request.__eq__ alone)."""
    skip = ("init_image", "latents", "width", "height")       # an unset size is compared as what it resolves to
    out = {f.name: getattr(req, f.name) for f in dataclasses.fields(req) if f.name not in skip}
    out["size"] = req.size
    out["sampler_options"] = dict(req.sampler_options)
    out["has_init_image"] = req.init_image is not None
    return out


def read(text: str, **overrides) -> FromInfotext:
    return Request.from_infotext(text, **overrides)


def a1111(*lines: str) -> str:
    """An infotext as A1111 stores it: lines joined by "\\n", no trailing newline."""
    return "\n".join(lines)


# ---- strategies ------------------------------------------------------------------------------------

# Pieces that stress the format: separators of the settings line, JSON's quote and escape, prompt
# syntax, the negative-prompt marker (inside a line), things that look like settings, non-ASCII.
_TRICKY = st.sampled_from([",", ", ", ":", ": ", '"', '\\"', "\\", "(", ")", "(masterpiece:1.2)", "[a|b]",
                           "<lora:add_detail:0.5>", "\n", "\n\n", " ", "  ", "\t", "Steps: 20, Seed: 1, Size: 8x8",
                           " Negative prompt: x", "Negative prompt", "é", "ü", "🐱", "日本語", "\u2028", "\x85",
                           "\xa0", "{", "}", "'"])
_PLAIN = st.text(st.characters(exclude_characters="\r", exclude_categories=("Cs",)), max_size=12)
free_text = st.lists(st.one_of(_TRICKY, _PLAIN), max_size=8).map("".join)


def _no_negative_marker(text: str) -> bool:
    # A prompt line starting "Negative prompt:" is, by the format's own rule, where the negative begins.
    return not any(line.startswith(NEGATIVE) for line in text.split("\n"))


prompts = free_text.filter(_no_negative_marker)
negatives = free_text          # inside the negative prompt that marker is just text
sides = st.none() | st.integers(1, 256).map(lambda k: 8 * k)          # 8..2048, or the default
guidance = st.floats(allow_nan=False, allow_infinity=False) | st.integers(-30, 30) | st.sampled_from([0, -0.0, 7.5])
seeds = st.none() | st.integers(0, 2**32 - 1)


@st.composite
def sampler_and_options(draw):
    spec = draw(st.sampled_from(every_combination()))
    options = {o.name: draw(st.integers(int(o.low), int(o.high)) if o.integer else
                            st.sampled_from([o.default, o.low, o.high]) | st.floats(o.low, o.high))
               for o in spec.options if draw(st.booleans())}
    return spec.full_name, options


@st.composite
def txt2img_requests(draw, prompt=prompts, negative=negatives):
    sampler, options = draw(sampler_and_options())
    return Request(draw(prompt), negative_prompt=draw(negative), width=draw(sides), height=draw(sides),
                   steps=draw(st.integers(1, 150)), sampler=sampler, sampler_options=options,
                   guidance_scale=draw(guidance), seed=draw(seeds), batch_size=draw(st.integers(1, 4)),
                   clip_skip=draw(st.sampled_from([1, 1, 2, 12])), prompt_syntax=draw(st.sampled_from(["a1111", "plain"])))


@st.composite
def img2img_requests(draw):
    base = draw(txt2img_requests())
    width, height = draw(st.integers(1, 3)) * 8, draw(st.integers(1, 3)) * 8
    strength = draw(st.floats(0, 1, exclude_min=True) | st.sampled_from([0.75, 1.0, 0.5]))
    assume(int(base.steps * strength) >= 1)             # a strength that leaves no step is refused
    return dataclasses.replace(base, width=None, height=None, init_image=torch.rand(3, height, width),
                               strength=strength)


# ---- 1. sd15's own infotexts read back as the request that wrote them ------------------------------

@PROPERTY
@given(req=txt2img_requests())
def test_every_request_reads_back_as_itself(req):
    text = req.infotext()
    back = read(text)
    assert settings_of(back.request) == settings_of(req), text
    assert back.request == req, text
    assert back.unsupported == {}, text
    assert back.model == ModelInfo() and back.version is None
    assert back.batch_pos == (0 if req.num_images > 1 else None)


@pytest.mark.parametrize("sampler", [spec.full_name for spec in every_combination()])
def test_every_sampler_reads_back(sampler):
    """The property test's draw, made certain for each sampler with each schedule type it takes."""
    req = Request("a cat", sampler=sampler, seed=1)
    assert read(req.infotext()).request.sampler == sampler


@pytest.mark.parametrize("eta", [0.3, 1.0, 1e-6])
def test_ddim_eta_reads_back(eta):
    req = Request("a cat", sampler="ddim", sampler_options={"eta": eta}, seed=1)
    assert "Eta DDIM: " in req.infotext()
    assert dict(read(req.infotext()).request.sampler_options) == {"eta": eta}


@PROPERTY
@given(data=st.data(), count=st.integers(2, 3), batch_size=st.integers(1, 2), per_image_negative=st.booleans())
def test_each_image_of_a_prompt_list_reads_back_as_its_own_prompt(data, count, batch_size, per_image_negative):
    """A prompt list writes one infotext per image; image i's regenerates image i's prompt, with the
    batch size of the whole batch, and says which image it was (`batch_pos`)."""
    texts = data.draw(st.lists(prompts, min_size=count, max_size=count))
    negative = tuple(data.draw(st.lists(negatives, min_size=count, max_size=count))) if per_image_negative \
        else data.draw(negatives)
    req = dataclasses.replace(data.draw(txt2img_requests()), prompt=texts, negative_prompt=negative,
                              batch_size=batch_size)
    assert req.num_images == count * batch_size
    for i in range(req.num_images):
        prompt = texts[i // batch_size]                          # diffusers' order: p0, p0, p1, p1, ...
        neg = negative[i // batch_size] if per_image_negative else negative
        back = read(req.infotext(i))
        expected = dataclasses.replace(req, prompt=prompt, negative_prompt=neg, batch_size=req.num_images)
        assert settings_of(back.request) == settings_of(expected)
        assert back.request == expected and back.batch_pos == i


@PROPERTY
@given(req=img2img_requests())
def test_img2img_reads_back_given_its_init_image(req):
    """The init image is not in the infotext: given back as an override, the request is whole again."""
    back = read(req.infotext(), init_image=req.init_image)
    assert settings_of(back.request) == settings_of(req)
    assert back.request == req and back.unsupported == {}


@PROPERTY
@given(req=img2img_requests())
def test_img2img_without_its_init_image_is_txt2img_and_says_so(req):
    back = read(req.infotext())
    assert list(back.unsupported) == ["Denoising strength"]
    assert float(back.unsupported["Denoising strength"]) == req.strength
    assert back.request.init_image is None and back.request.strength == 1.0
    assert back.request.size == req.size                                        # from "Size"
    width, height = req.size                                                    # the size it ran at
    assert back.request == dataclasses.replace(req, init_image=None, strength=None, width=width, height=height)


def test_model_info_reads_back():
    model = ModelInfo("my-model", "6ce0161689", "vae-ft-mse.safetensors")
    req = Request("a cat", seed=5)
    back = read(req.infotext(model=model))
    assert back.model == model
    assert back.request == req and back.unsupported == {}          # information, not settings


@pytest.mark.parametrize("model", [ModelInfo("my, model: v2", "abc", "a\nb"), ModelInfo("naïve 模型"),
                                   ModelInfo(vae='say "hi", ok'), ModelInfo("", "", "")])
def test_model_info_with_separators_reads_back(model):
    assert read(Request("a cat").infotext(model=model)).model == model


@pytest.mark.parametrize("model", [ModelInfo('"v2"'), ModelInfo(" padded "), ModelInfo('"my', vae='vae"')],
                         ids=["quoted-name", "padded-name", "quote-swallows-next-field"])
def test_model_info_with_quotes_or_padding_reads_back(model):
    assert read(Request("a cat").infotext(model=model)).model == model


# ---- 2. infotexts as A1111 1.x writes them ---------------------------------------------------------

V1_10_HIRES = a1111(
    "masterpiece, best quality, (a lighthouse:1.2) at dusk, <lora:add_detail:0.5>",
    "Negative prompt: lowres, bad anatomy, (worst quality:1.4)",
    "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 3141592653, Size: 512x768, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, VAE hash: 735e4c3a44, "
    "VAE: vae-ft-mse-840000-ema-pruned.safetensors, Denoising strength: 0.5, Clip skip: 2, ENSD: 31337, "
    "Face restoration: CodeFormer, Hires upscale: 2, Hires steps: 10, Hires upscaler: Latent, "
    'Lora hashes: "add_detail: 7c6bd4a8f1a2", TI hashes: "easynegative: c74b4e810b03", Emphasis: No norm, '
    "Version: v1.10.1")


def test_a1111_hires_infotext_with_unsupported_fields():
    back = read(V1_10_HIRES)
    r = back.request
    assert r.prompt == "masterpiece, best quality, (a lighthouse:1.2) at dusk, <lora:add_detail:0.5>"
    assert r.negative_prompt == "lowres, bad anatomy, (worst quality:1.4)"
    assert (r.steps, r.sampler, r.guidance_scale, r.seed) == (28, "dpmpp_2m_karras", 6.5, 3141592653)
    assert r.size == (512, 768)
    # The hires fix: txt2img with a second pass; its denoising strength is the second pass's.
    assert r.init_image is None and r.strength == 1.0
    assert r.hires == Hires(scale=2, upscaler="Latent", steps=10, denoising_strength=0.5)
    # Everything sd15 cannot apply comes back, values unquoted, none dropped.
    assert back.unsupported == {
        "Face restoration": "CodeFormer", "Emphasis": "No norm"}
    assert back.lora_hashes == {"add_detail": "7c6bd4a8f1a2"}      # read: checked when the tag's LoRA is loaded
    assert (r.seed_mode, r.noise_seed_delta) == ("a1111", 31337)     # an A1111 image: its seeds, its ENSD
    # Clip skip is applied; TI hashes say which embeddings the image used (information).
    assert r.clip_skip == 2 and back.ti_hashes == {"easynegative": "c74b4e810b03"}
    # Model, hashes and version are information, not unsupported settings.
    assert back.model == ModelInfo("v1-5-pruned-emaonly", "6ce0161689", "vae-ft-mse-840000-ema-pruned.safetensors")
    assert back.version == "v1.10.1" and back.batch_pos is None
    assert not {"Model", "Model hash", "VAE", "VAE hash", "Version"} & set(back.unsupported)


def test_a1111_pre_1_9_sampler_name_with_schedule_in_it():
    """Before 1.9 the schedule was part of the sampler's name and there was no "Schedule type"."""
    back = read(a1111(
        "a photo of an astronaut riding a horse on mars",
        "Negative prompt: cartoon, 3d",
        "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1234, Size: 512x512, Model hash: 6ce0161689, "
        "Model: v1-5-pruned-emaonly, Version: v1.6.0"))
    r = back.request
    assert (r.prompt, r.negative_prompt) == ("a photo of an astronaut riding a horse on mars", "cartoon, 3d")
    assert (r.steps, r.sampler, r.guidance_scale, r.seed, *r.size) == \
        (20, "dpmpp_2m_karras", 7.0, 1234, 512, 512)
    assert back.unsupported == {} and back.version == "v1.6.0"
    assert back.model == ModelInfo("v1-5-pruned-emaonly", "6ce0161689")


@pytest.mark.parametrize("sampler_fields, expected", [
    ("Sampler: DPM++ 2M Karras", "dpmpp_2m_karras"),                    # < 1.9
    ("Sampler: DPM++ 2M, Schedule type: Karras", "dpmpp_2m_karras"),    # >= 1.9
    ("Sampler: DPM++ 2M, Schedule type: Automatic", "dpmpp_2m_karras"),   # 1.9+: Automatic is Karras for it
    ("Sampler: DPM++ 2M, Schedule type: Uniform", "dpmpp_2m_uniform"),
    ("Sampler: Euler a, Schedule type: Automatic", "euler_a"),
    ("Sampler: Euler a", "euler_a"),
    ("Sampler: Euler, Schedule type: Karras", "euler_karras"),
    ("Sampler: Euler Karras", "euler_karras"),
    ("Sampler: DDIM, Schedule type: Automatic", "ddim"),
])
def test_a1111_sampler_spellings(sampler_fields, expected):
    back = read(f"a cat\nSteps: 20, {sampler_fields}, CFG scale: 7, Seed: 1, Size: 512x512")
    assert back.request.sampler == expected and back.unsupported == {}


def test_a1111_multiline_prompt_and_no_negative_prompt():
    back = read(a1111(
        "a cozy cabin in the woods,",
        "snow falling: warm light, (film grain:0.8)",
        "Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 1234, Size: 512x768, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.10.1"))
    r = back.request
    assert r.prompt == "a cozy cabin in the woods,\nsnow falling: warm light, (film grain:0.8)"
    assert r.negative_prompt == ""
    assert (r.steps, r.sampler, r.guidance_scale, r.seed, *r.size) == (20, "euler_a", 7.0, 1234, 512, 768)
    assert back.unsupported == {}


def test_a1111_ddim_with_eta_and_multiline_negative_prompt():
    back = read(a1111(
        "portrait of an old sailor",
        "Negative prompt: blurry,",
        "lowres,",
        "watermark",
        "Steps: 50, Sampler: DDIM, Schedule type: Automatic, CFG scale: 9, Seed: 42, Size: 768x512, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Eta DDIM: 0.3, Version: v1.10.1"))
    r = back.request
    assert r.prompt == "portrait of an old sailor"
    assert r.negative_prompt == "blurry,\nlowres,\nwatermark"
    assert (r.steps, r.sampler, r.guidance_scale, r.seed, *r.size) == (50, "ddim", 9.0, 42, 768, 512)
    assert dict(r.sampler_options) == {"eta": 0.3}
    assert back.unsupported == {}


def test_a1111_eta_ddim_with_another_sampler_is_unsupported():
    """"Eta DDIM" means nothing to Euler: reported, not applied."""
    back = read("a cat\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 512x512, Eta DDIM: 0.3")
    assert dict(back.request.sampler_options) == {} and back.unsupported == {"Eta DDIM": "0.3"}


def test_a1111_json_quoted_values():
    back = read(a1111(
        "a red fox",
        "Steps: 30, Sampler: Euler, Schedule type: Karras, CFG scale: 5.5, Seed: 7, Size: 640x448, "
        'Model hash: 0123456789, Model: "my, model: v2", VAE: "the \\"good\\" vae, v1", '
        'Wildcard prompt: "a \\"fox\\",\\nin snow", Version: v1.10.1'))
    r = back.request
    assert (r.prompt, r.negative_prompt) == ("a red fox", "")
    assert (r.steps, r.sampler, r.guidance_scale, r.seed, *r.size) == \
        (30, "euler_karras", 5.5, 7, 640, 448)
    assert back.model == ModelInfo("my, model: v2", "0123456789", 'the "good" vae, v1')
    assert back.unsupported == {"Wildcard prompt": 'a "fox",\nin snow'}
    assert back.version == "v1.10.1"


def test_a1111_negative_cfg_and_big_seed():
    back = read("x\nSteps: 1, Sampler: Euler a, CFG scale: -2.5, Seed: 4294967295, Size: 8x2048")
    r = back.request
    assert (r.steps, r.guidance_scale, r.seed, *r.size) == (1, -2.5, 4294967295, 8, 2048)


def test_overrides_replace_infotext_fields():
    back = read(V1_10_HIRES, seed=9, steps=12, prompt="something else")
    assert (back.request.seed, back.request.steps, back.request.prompt) == (9, 12, "something else")
    assert back.request.negative_prompt == "lowres, bad anatomy, (worst quality:1.4)"   # the rest from the text


def test_a1111_denoising_strength_applies_with_an_init_image():
    back = read(V1_10_HIRES, init_image=torch.rand(3, 768, 512))
    assert back.request.strength == 0.5 and "Denoising strength" not in back.unsupported


def test_fields_after_an_unparsable_segment_are_not_dropped():
    back = read(a1111(
        "a cat",
        'Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Model hash: 6ce0161689, '
        'Hashes: {"model": "6ce0161689", "vae": "735e4c3a44"}, Face restoration: CodeFormer, ENSD: 31337, '
        'Version: v1.10.1'))
    assert "Hashes" in back.unsupported
    assert back.unsupported.get("Face restoration") == "CodeFormer"
    assert back.request.noise_seed_delta == 31337
    assert back.version == "v1.10.1"


def test_trailing_blank_lines_are_ignored():
    back = read("a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512\n\n")
    assert back.request.prompt == "a cat" and back.request.steps == 20 and back.request.seed == 1


def test_one_trailing_newline_is_ignored():
    back = read("a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512\n")
    assert back.request.prompt == "a cat" and back.request.steps == 20


# ---- 3. errors, and text that is all prompt ---------------------------------------------------------

UNKNOWN_SAMPLER = "a cat\nSteps: 20, Sampler: DPM adaptive, CFG scale: 7, Seed: 1, Size: 512x512"


def test_unknown_sampler_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"DPM adaptive") as e:
        read(UNKNOWN_SAMPLER)
    assert all(name in str(e.value) for name in SAMPLERS)


def test_unknown_sampler_is_fine_when_overridden():
    r = read(UNKNOWN_SAMPLER, sampler="euler").request
    assert (r.sampler, r.steps, r.seed, r.prompt) == ("euler", 20, 1, "a cat")


@pytest.mark.parametrize("field, value", [("Steps", "many"), ("CFG scale", "high"), ("Seed", "0x1f"),
                                          ("Size", "big"), ("Size", "512x"), ("Eta DDIM", "some")])
def test_bad_number_names_the_field(field, value):
    fields = {"Steps": "20", "Sampler": "DDIM", "CFG scale": "7", "Seed": "1", "Size": "512x512"} | {field: value}
    text = "a cat\n" + ", ".join(f"{k}: {v}" for k, v in fields.items())
    with pytest.raises(ValueError, match=field):
        read(text)


@pytest.mark.parametrize("text", [
    "a cat\nSteps: 20, Sampler: Euler a",                 # two pairs: not a settings line
    "style: anime, mood: dark",
    "masterpiece, best quality, a cat",
    "",
])
def test_text_without_a_settings_line_is_all_prompt(text):
    back = read(text)
    r = back.request
    assert (r.prompt, r.negative_prompt) == (text, "")
    # request.py's documented defaults: DPM++ 2M Karras, 25 steps, CFG 7.5, 512x512, a random seed.
    assert (r.sampler, r.steps, r.guidance_scale, *r.size, r.seed) == \
        ("dpmpp_2m_karras", DEFAULT_STEPS, DEFAULT_GUIDANCE, DEFAULT_SIZE, DEFAULT_SIZE, None)
    assert back.request == Request(text)
    assert back.unsupported == {} and back.model == ModelInfo() and back.version is None


def test_negative_prompt_without_a_settings_line():
    back = read("a cat\nNegative prompt: dog\nSteps: 20, Seed: 5")
    assert (back.request.prompt, back.request.negative_prompt) == ("a cat", "dog\nSteps: 20, Seed: 5")
    assert back.request.steps == Request("a cat").steps and back.request.seed is None


def test_a_single_settings_line_has_an_empty_prompt():
    back = read("Steps: 20, Sampler: Euler, CFG scale: 7")
    assert (back.request.prompt, back.request.steps, back.request.sampler) == ("", 20, "euler")


def test_infotext_must_be_text():
    with pytest.raises(ValueError, match="text"):
        parse_infotext(b"Steps: 20, Sampler: Euler, CFG scale: 7")


# ---- 4. parse_infotext on its own --------------------------------------------------------------------

def test_parse_keys_values_and_order():
    line = ('Steps: 20, Sampler: Euler a, CFG scale: 7, Hires upscale: 2, Hires-fix/upscaler: 4x-UltraSharp, '
            'ControlNet 0: "Module: canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 1", '
            'Lora hashes: "add_detail: 7c6bd4a8f1a2, more_details: 3b8aa1d351ef", Note: "say \\"hi\\"\\nbye", '
            'Empty: , Version: v1.10.1')
    info = parse_infotext("a cat\n" + line)
    assert (info.prompt, info.negative_prompt) == ("a cat", "")
    assert list(info.fields.items()) == [
        ("Steps", "20"), ("Sampler", "Euler a"), ("CFG scale", "7"), ("Hires upscale", "2"),
        ("Hires-fix/upscaler", "4x-UltraSharp"),
        ("ControlNet 0", "Module: canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 1"),
        ("Lora hashes", "add_detail: 7c6bd4a8f1a2, more_details: 3b8aa1d351ef"),
        ("Note", 'say "hi"\nbye'), ("Empty", ""), ("Version", "v1.10.1")]


def test_parse_keeps_an_invalid_json_string_as_written():
    """A1111's unquote: a value in quotes that is not valid JSON stays as it is."""
    info = parse_infotext("p\n" r'Steps: 20, Sampler: Euler, Odd: "bad \x escape", Seed: 1')
    assert info.fields["Odd"] == r'"bad \x escape"' and info.fields["Seed"] == "1"


def test_parse_prompt_and_negative_prompt_lines():
    info = parse_infotext("line one\n  line two  \nNegative prompt: n1\nn2\nNegative prompt: n3\n"
                          "Steps: 1, Sampler: Euler, Seed: 2")
    # Prompt lines are kept as written (sd15 round-trips them exactly); only the marker's space goes.
    assert info.prompt == "line one\n  line two  "
    assert info.negative_prompt == "n1\nn2\nNegative prompt: n3"


# Keys as A1111 and its extensions spell them: a word character first, then words, spaces, '-', '/'.
_keys = st.from_regex(r"\A[A-Za-z0-9_][A-Za-z0-9_ /-]{0,12}[A-Za-z0-9_]\Z")


@PROPERTY
@given(prompt=prompts, negative=negatives,
       fields=st.dictionaries(_keys, free_text, min_size=3, max_size=6))
def test_parse_inverts_format(prompt, negative, fields):
    info = parse_infotext(format_infotext(prompt, negative, fields))
    assert (info.prompt, info.negative_prompt) == (prompt, negative)
    assert list(info.fields.items()) == list(fields.items())


@pytest.mark.parametrize("value", [7.5, 0, -1.25, 1e-05, 4294967295, "512x768"])
def test_plain_values_read_back_as_their_text(value):
    info = parse_infotext(format_infotext("p", "", {"A": value, "B": 1, "C": 2}))
    assert info.fields["A"] == str(value)
    if isinstance(value, float):
        assert float(info.fields["A"]) == value             # str(float) reads back exactly


# ---- reading rules added after review ------------------------------------------------------------------

A1111_LINE = "Steps: 20, CFG scale: 7, Seed: 1234, Size: 512x512, Model hash: 6ce0161689, Version: v1.10.1"


@pytest.mark.parametrize("sampler,expected", [
    ("Sampler: DPM++ 2M Karras, Schedule type: Karras", "dpmpp_2m_karras"),   # a pre-1.9 name, plus the 1.9 field
    ("Sampler: DPM++ 2M, Schedule type: Karras", "dpmpp_2m_karras"),
    ("Sampler: Euler, Schedule type: Automatic", "euler"),
])
def test_sampler_spellings_with_a_schedule_type(sampler, expected):
    assert read(f"a cat\n{sampler}, {A1111_LINE}").request.sampler == expected


@pytest.mark.parametrize("sampler", ["Sampler: Euler a, Schedule type: Beta", "Sampler: LCM, Schedule type: Karras",
                                     "Sampler: DPM++ 2M Karras, Schedule type: Exponential"])
def test_a_schedule_sd15_lacks_is_an_error_not_another_schedule(sampler):
    """Falling back to the sampler's own schedule would quietly make another picture."""
    with pytest.raises(ValueError, match=r"the infotext's sampler \(.*schedule type.*\) is not one sd15 has"):
        read(f"a cat\n{sampler}, {A1111_LINE}")
    assert read(f"a cat\n{sampler}, {A1111_LINE}", sampler="euler").request.sampler == "euler"


def test_an_a1111_batch_image_regenerates_alone_with_its_own_seed():
    """A1111 writes image i of a batch with seed + i (and a Version field); sd15 writes the batch's seed."""
    a1111 = read("a cat\nSampler: Euler a, Batch size: 4, Batch pos: 2, " + A1111_LINE.replace("1234", "1236"))
    assert (a1111.request.batch_size, a1111.request.seed, a1111.batch_pos) == (1, 1236, None)
    assert "Batch size" not in a1111.unsupported and "Batch pos" not in a1111.unsupported
    ours = read(Request("a cat", batch_size=4, seed=1234).infotext(2))
    assert (ours.request.batch_size, ours.request.seed, ours.batch_pos) == (4, 1234, 2)


def test_eta_as_older_sd15_versions_wrote_it():
    back = read("a cat\nSteps: 10, Sampler: DDIM, CFG scale: 7, Seed: 1, Size: 64x64, Eta: 0.5")
    assert dict(back.request.sampler_options) == {"eta": 0.5} and back.unsupported == {}


def test_a_flat_json_value_is_read_whole():
    back = read('a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, '
                'Hashes: {"model": "6ce0161689", "vae": "735e4c3a44"}, ENSD: 31337')
    assert back.unsupported == {"Hashes": '{"model": "6ce0161689", "vae": "735e4c3a44"}', "ENSD": "31337"}


def test_windows_line_endings():
    back = read("a cat\r\nNegative prompt: dog\r\nSteps: 3, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64\r\n")
    assert (back.request.prompt, back.request.negative_prompt, back.request.steps) == ("a cat", "dog", 3)


def test_a1111s_emphasis_none_keeps_the_rest_of_the_prompt_language():
    """A1111's emphasis mode "None" reads brackets and BREAK as text; AND, prompt editing and tags stay."""
    back = read("a [cat:dog:5] AND a tree :0.5\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 512x512, "
                "Emphasis: None, Version: v1.10.1")
    assert (back.request.emphasis, back.request.prompt_syntax) == ("none", "a1111") and back.unsupported == {}
    plain = Request("literal (text) AND more", prompt_syntax="plain")
    assert plain.emphasis == "none"
    text = plain.infotext()
    assert "Emphasis: None, Prompt syntax: plain" in text and read(text).request == plain


@pytest.mark.parametrize("sampler,expected", [
    ("Sampler: DDIM, Schedule type: Karras", "ddim"),      # A1111 1.9+ writes it; its timestep samplers ignore it
    ("Sampler: PLMS, Schedule type: Exponential", "plms"),
    ("Sampler: UniPC, Schedule type: Karras", "unipc"),
])
def test_a1111_timestep_samplers_ignore_their_schedule_type(sampler, expected):
    assert read(f"a cat\n{sampler}, {A1111_LINE}").request.sampler == expected


@pytest.mark.parametrize("sampler,version,expected", [
    ("Sampler: DPM++ 2M", "v1.6.0", "dpmpp_2m_uniform"),        # before 1.9: the name alone was uniform
    ("Sampler: DPM++ 2M Karras", "v1.6.0", "dpmpp_2m_karras"),
    ("Sampler: DPM++ 2M", "v1.10.1", "dpmpp_2m_karras"),        # 1.9+: Automatic is Karras for it
    ("Sampler: Euler a", "v1.5.2", "euler_a"),
])
def test_pre_1_9_names_keep_their_schedule(sampler, version, expected):
    line = A1111_LINE.replace("v1.10.1", version)
    assert read(f"a cat\n{sampler}, {line}").request.sampler == expected
