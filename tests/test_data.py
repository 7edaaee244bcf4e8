"""Data specs: built-ins, files and folders, determinism, held-out split, bad specs."""
import pytest
import torch

import midl_convert as mc
from midl_convert.data import HELDOUT_PHOTOS, TRAIN_PHOTOS, load_data
from midl_convert.text_sources import text_sentences


@pytest.fixture(scope="module")
def vision():
    return mc.load_model("resnet18", random_init=True, num_classes=10)


@pytest.fixture(scope="module")
def text():
    return mc.load_model("sentence-transformers/all-MiniLM-L6-v2")


def test_builtin_images_are_deterministic_and_held_out_photos_are_separate(vision):
    data = load_data("builtin:images", vision, seed=3)
    a, b = data.train_batch(5, 4), data.train_batch(5, 4)
    assert a.inputs[0].shape == (4, 3, 224, 224)
    assert torch.equal(a.inputs[0], b.inputs[0])
    assert not torch.equal(a.inputs[0], data.train_batch(6, 4).inputs[0])
    assert not set(TRAIN_PHOTOS) & set(HELDOUT_PHOTOS)
    held = data.heldout_batches(16)
    assert sum(x.size for x in held) == 64
    assert torch.equal(held[0].inputs[0], data.heldout_batches(16)[0].inputs[0])
    # normalised with the model's mean / std: roughly centred
    assert abs(a.inputs[0].mean().item()) < 1.5


def test_builtin_text_split_and_tokenisation(text):
    sentences = text_sentences()
    assert len(sentences) > 1500
    data = load_data("builtin:text", text)
    assert not set(data.train) & set(data.heldout)
    batch = data.train_batch(0, 8)
    assert batch.inputs["input_ids"].shape[0] == 8 and "attention_mask" in batch.inputs


def test_builtin_text_is_judged_on_another_source(text):
    """Held-out sentences come from the King James Bible, which training (Python's help text) never reads."""
    from midl_convert.data import kjv_sentences

    data = load_data("builtin:text", text)
    assert len(data.heldout) == 512 and set(data.heldout) <= set(kjv_sentences())
    assert set(data.train) == set(text_sentences())  # every help sentence is training data now
    assert not set(data.heldout) & set(data.train)
    verses = kjv_sentences(5)
    assert verses == kjv_sentences()[:5] and all(40 <= len(v) <= 300 and not v[0].isdigit() for v in verses)


def test_builtin_mixed_widens_training_text_and_judges_on_the_same_verses(text):
    from midl_convert import text_sources

    assert text_sources.sentences("Short. This sentence is long enough to count as prose here. x = {{a}} is code, "
                                  "not prose at all here. lowercase starts are left out of the text too.") == [
        "This sentence is long enough to count as prose here."]
    data = load_data("builtin:mixed", text)
    docstrings = set(text_sources.stdlib_docstrings())
    assert "Return the number of items in a which are, or which equal, b." in docstrings  # operator.countOf
    assert set(text_sentences()) <= set(data.train) and docstrings <= set(data.train)
    assert len(data.train) > 3 * len(text_sentences())
    assert data.heldout == load_data("builtin:text", text).heldout  # judged on the same Bible verses
    assert not set(data.heldout) & set(data.train)
    assert data.spec == "builtin:mixed"


def test_builtin_digits_have_labels(vision):
    data = load_data("builtin:digits", vision)
    batch = data.heldout_batches(32)[0]
    assert batch.labels is not None and batch.labels.shape == (32,) and batch.labels.max() <= 9
    assert len(data.heldout) == 360


def test_text_file_and_image_folder_and_datasets_folder(tmp_path, text, vision):
    from PIL import Image

    txt = tmp_path / "lines.txt"
    txt.write_text("\n".join(f"Sentence number {i} about layers." for i in range(20)))
    d = load_data(str(txt), text)
    assert len(d.train) + len(d.heldout) == 20
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 30), (i * 40, 0, 0)).save(tmp_path / "imgs" / cls / f"{i}.png")
    d = load_data(str(tmp_path / "imgs"), vision)
    batch = d.train_batch(0, 2)
    assert batch.inputs[0].shape == (2, 3, 224, 224) and batch.labels is not None
    import datasets

    datasets.Dataset.from_dict({"text": [f"row {i}" for i in range(10)], "label": list(range(10))}).save_to_disk(str(tmp_path / "ds"))
    d = load_data(str(tmp_path / "ds"), text)
    assert d.train_batch(0, 3).labels.shape == (3,)


@pytest.mark.parametrize("spec,message", [
    ("builtin:video", r"unknown built-in data 'builtin:video'; use one of builtin:images"),
    ("/nonexistent/folder", r"data '/nonexistent/folder' does not exist; pass an image folder"),
])
def test_bad_specs(spec, message, vision):
    with pytest.raises(mc.MIDLError, match=message):
        load_data(spec, vision)


def test_bad_files(tmp_path, vision):
    (tmp_path / "x.bmp").write_bytes(b"0")
    with pytest.raises(mc.MIDLError, match=r"unsupported file type '.bmp'"):
        load_data(str(tmp_path / "x.bmp"), vision)
    (tmp_path / "empty").mkdir()
    with pytest.raises(mc.MIDLError, match=r"is not an image folder"):
        load_data(str(tmp_path / "empty"), vision)
    with pytest.raises(mc.MIDLError, match=r"text data needs a tokenizer"):
        (tmp_path / "t.txt").write_text("a\nb\nc\n")
        load_data(str(tmp_path / "t.txt"), vision)


@pytest.mark.parametrize("name,content,message", [
    ("d.csv", "", r"is an empty file"),
    ("d.csv", "text,label\n", r"has a header but no rows"),
    ("d.json", "{not json at all", r"cannot be read \("),
    ("d.parquet", b"PAR1 certainly not parquet", r"cannot be read \("),
    ("d.csv", "text,label\n" + "a sentence here,cat\n" * 20, r"column 'label' holds 'cat', not a class index"),
    ("ds/dataset_info.json", "{}", r"cannot be read \(|not a Dataset"),
    ("imgs/cat/a.jpg", "not a jpeg", r"is not an image PIL can read"),
])
def test_bad_data_files_are_one_clear_error(tmp_path, text, vision, name, content, message):
    """Each raised a raw exception (pandas, pyarrow, datasets, PIL, int()) before."""
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    for copy in range(5 if name.startswith("imgs") else 1):  # an image folder needs a training and a held-out part
        path.with_stem(f"{path.stem}{copy or ''}").write_bytes(content if isinstance(content, bytes) else content.encode())
    spec = str(tmp_path / name.split("/")[0])
    model = vision if name.startswith("imgs") else text
    with pytest.raises(mc.MIDLError, match=message):
        data = load_data(spec, model)
        data.train_batch(0, 2)  # images open when drawn


def test_images_for_a_text_model_are_refused(text):
    with pytest.raises(mc.MIDLError, match=r"builtin:images holds images and .* reads text \(task: .*\); pass text data"):
        load_data("builtin:images", text)


def decoder_tokenizer():
    """A GPT-2-like tokenizer: no pad token, and padding on the left (as set for generation)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for s in text_sentences()[:400] for w in s.split()})
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", "<eos>", *words])}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")
    tok.padding_side = "left"
    return tok


def test_builtin_text_for_a_decoder_pads_on_the_right_with_eos():
    tok = decoder_tokenizer()
    loaded = mc.LoadedModel(torch.nn.Identity(), "tiny-decoder", "hf", "causal-lm", {}, tokenizer=tok)
    batch = load_data("builtin:text", loaded).train_batch(0, 8)
    ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]
    assert set(batch.inputs) == {"input_ids", "attention_mask"} and ids.shape == mask.shape and ids.shape[0] == 8
    assert (mask[:, 0] == 1).all() and (mask.diff(dim=1) <= 0).all()  # real tokens first, then padding
    assert (mask == 0).any() and (ids[mask == 0] == tok.eos_token_id).all()
    assert tok.pad_token is None and tok.padding_side == "left"  # the model's tokenizer is not changed


def _tiny_causal_lm(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    from midl_convert.models import LoadedModel

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()
    ids = tokenizer(["a short prompt"], return_tensors="pt")["input_ids"]
    return LoadedModel(model, "tiny-llama", "hf", "causal-lm", {"input_ids": ids}, tokenizer=tokenizer)


def test_builtin_teacher_samples_the_model_itself_and_judges_on_bible_verses(text, monkeypatch):
    import copy

    from midl_convert import sampling
    from midl_convert.data import kjv_sentences
    from midl_convert.sampling import sample_texts

    tok = copy.deepcopy(text.tokenizer)
    lm = _tiny_causal_lm(tok)
    with pytest.raises(mc.MIDLError, match="start"):  # BERT's tokenizer has neither bos nor eos
        sample_texts(lm.model, tok, count=2, tokens=4)
    tok.bos_token = "[CLS]"
    state = torch.random.get_rng_state()
    a = sample_texts(lm.model, tok, count=5, tokens=6, seed=1, batch=2)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random stream is left alone
    assert len(a) == 5 and all(a)
    assert a == sample_texts(lm.model, tok, count=5, tokens=6, seed=1, batch=2)
    assert a != sample_texts(lm.model, tok, count=5, tokens=6, seed=2, batch=2)
    # each text is 6 sampled tokens after the start token: it tokenises back to about that many
    assert all(1 <= len(tok(t, add_special_tokens=False)["input_ids"]) <= 12 for t in a)
    monkeypatch.setattr(sampling, "SAMPLES", 40)
    monkeypatch.setattr(sampling, "SAMPLE_TOKENS", 8)
    data = load_data("builtin:teacher", lm, seed=1)
    assert len(data.train) == 40 and not set(data.train) & set(data.heldout)
    assert data.heldout == kjv_sentences(512)
    assert data.train_batch(0, 4).inputs["input_ids"].shape[0] == 4


def test_builtin_teacher_refuses_a_model_that_does_not_generate(text):
    with pytest.raises(mc.MIDLError, match="builtin:text"):
        load_data("builtin:teacher", text)


def test_default_data_widens_text_encoders_and_keeps_help_text_for_decoders():
    from midl_convert.data import default_data
    from midl_convert.models import LoadedModel

    def loaded(task: str, tokenizer: object) -> LoadedModel:
        return LoadedModel(torch.nn.Identity(), "m", "hf", task, {}, tokenizer=tokenizer)

    assert default_data(loaded("embedding", object())) == "builtin:mixed"
    assert default_data(loaded("base", object())) == "builtin:mixed"
    assert default_data(loaded("causal-lm", object())) == "builtin:text"
    assert default_data(loaded("classifier", None)) == "builtin:images"
