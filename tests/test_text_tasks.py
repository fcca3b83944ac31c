"""Text files (.txt, .jsonl, .csv) and image folders as tasks; the causal-LM metrics on known values."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("tokenizers", reason="the 'text' extra (tokenizers) is not installed")

from hf_fixtures import TEXTS, word_tokenizer, write_lines  # noqa: E402

from analysis.cli.main import main  # noqa: E402
from analysis.data.metrics import MetricState, get_metric  # noqa: E402
from analysis.data.options import split_calib_eval  # noqa: E402
from analysis.data.tasks import TaskError, load_task, npz_task  # noqa: E402
from analysis.data.text import IGNORE_INDEX  # noqa: E402

torch.set_num_threads(1)


def _folder(tmp_path, architecture="BertForSequenceClassification", extra=None):
    """A model folder's metadata only (config.json + tokenizer): all a text task reads."""
    folder = tmp_path / "model"
    vocab = word_tokenizer(folder, ["[PAD]", "[UNK]", "[CLS]", "[SEP]"], "[CLS] $A [SEP]",
                           {"pad_token": "[PAD]", "model_max_length": 64})
    (folder / "config.json").write_text(json.dumps({"architectures": [architecture], "model_type": "bert",
                                                    "max_position_embeddings": 64, **(extra or {})}))
    return folder, vocab


def test_txt_is_one_text_a_line_tokenized_padded_and_split_as_npz_tasks_split(tmp_path):
    folder, vocab = _folder(tmp_path, "BertModel")
    data = write_lines(tmp_path / "t.txt", TEXTS[:10] + ["", "   "] + TEXTS[10:])  # blank lines are not samples
    t = load_task(str(data), model=str(folder))
    assert (len(t.calib_inputs), len(t.eval_inputs)) == (6, 18) and t.eval_labels is None
    assert t.metric == "embedding" and t.pad_id == 0 and t.eval_inputs.dtype == np.int64
    assert t.source == str(data) and t.name == "t"
    ids = np.concatenate([t.calib_inputs, t.eval_inputs])
    assert (ids[:, 0] == vocab["[CLS]"]).all()
    lengths = (ids != 0).sum(1)
    assert all((row[:n] != 0).all() and (row[n:] == 0).all() for row, n in zip(ids, lengths))  # right-padded
    assert ((t.eval_inputs[:, :] != 0).sum(1) == np.sort((t.eval_inputs != 0).sum(1))).all()  # eval sorted by length
    # the same draw as an .npz of the same samples
    np.savez(tmp_path / "n.npz", inputs=np.arange(24, dtype=np.float32)[:, None])
    n = npz_task(tmp_path / "n.npz", seed=3)
    ci, ei = split_calib_eval(24, None, 3)
    assert (n.calib_inputs[:, 0] == ci).all() and (n.eval_inputs[:, 0] == ei).all()
    # max_length truncates, [SEP] kept by the tokenizer's template
    short = load_task(str(data), model=str(folder), options={"max_length": "5"})
    assert short.eval_inputs.shape[1] == 5 and (short.eval_inputs[:, -1] == vocab["[SEP]"]).all()


def _text_indices(task, folder):
    """Index in TEXTS of each evaluation sample (by its token ids)."""
    from analysis.data.hf_folder import load_tokenizer

    encoded = [tuple(e.ids) for e in load_tokenizer(folder).encode_batch(TEXTS)]
    return [encoded.index(tuple(r[r != task.pad_id])) for r in task.eval_inputs]


def test_jsonl_labels_follow_the_models_label2id_else_sorted_order(tmp_path):
    rows = [{"text": t, "label": ["pos", "neg", "mid"][i % 3]} for i, t in enumerate(TEXTS)]
    data = write_lines(tmp_path / "r.jsonl", [json.dumps(r) for r in rows])
    plain, _ = _folder(tmp_path / "a")
    t = load_task(str(data), model=str(plain), calib=4)
    assert t.metric is None  # accuracy with labels, chosen once the output is known
    in_order = {"mid": 0, "neg": 1, "pos": 2}
    assert [in_order[rows[i]["label"]] for i in _text_indices(t, plain)] == list(t.eval_labels)
    named, _ = _folder(tmp_path / "b", extra={"label2id": {"neg": 0, "mid": 1, "pos": 2}})
    t2 = load_task(str(data), model=str(named), calib=4)
    as_named = {"neg": 0, "mid": 1, "pos": 2}
    assert [as_named[rows[i]["label"]] for i in _text_indices(t2, named)] == list(t2.eval_labels)
    ints = write_lines(tmp_path / "i.jsonl", [json.dumps({"text": t, "label": i % 4}) for i, t in enumerate(TEXTS)])
    t3 = load_task(str(ints), model=str(plain), calib=4)
    assert [i % 4 for i in _text_indices(t3, plain)] == list(t3.eval_labels) and t3.eval_labels.dtype == np.int64


def test_csv_columns_by_option_and_lm_labels_are_the_ids(tmp_path):
    import csv

    path = tmp_path / "d.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "sentence", "grade"])
        for i, t in enumerate(TEXTS):
            w.writerow([i, t, i % 2])
    folder, _ = _folder(tmp_path)
    t = load_task(str(path), model=str(folder), options={"text_column": "sentence", "label_column": "grade"})
    assert len(t.eval_labels) == len(t.eval_inputs) and set(t.eval_labels) == {0, 1}
    lm, _ = _folder(tmp_path / "lm", "LlamaForCausalLM")
    t = load_task(str(path), model=str(lm), options={"text_column": "sentence"})
    assert t.metric == "perplexity" and t.batch_size == 8
    want = np.where(t.eval_inputs == t.pad_id, IGNORE_INDEX, t.eval_inputs)
    assert (t.eval_labels == want).all()


@pytest.mark.parametrize("name, content, options, message", [
    ("d.csv", "sentence,label\nhello,1\nworld,0\n", {}, "column 'text' is missing (columns: sentence, label)"),
    ("d.csv", "text,label\nhello,1\nworld,0\n", {"label_column": "grade"}, "column 'grade' is missing"),
    ("d.jsonl", '{"text": "a"}\n{"body": "b"}\n', {}, "line 2: field 'text' is missing (found: body)"),
    ("d.jsonl", '{"text": "a"}\nnot json\n', {}, "line 2: not JSON"),
    ("d.jsonl", '{"text": "a", "label": 1}\n{"text": "b"}\n', {}, "line 2: field 'label' is missing"),
    ("d.txt", "a\nb\n", {"text_column": "x"}, "--task-option text_column"),
    ("d.txt", "a\nb\n", {"colour": "red"}, "--task-option colour: unknown"),
    ("d.txt", "a\nb\n", {"max_length": "many"}, "--task-option max_length=many: not an integer"),
    ("d.txt", "only one line\n", {}, "holds 1 text(s)"),
])
def test_bad_text_input_is_one_error_naming_file_and_field(tmp_path, name, content, options, message):
    folder, _ = _folder(tmp_path)
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(TaskError) as e:
        load_task(str(path), model=str(folder), options=options)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert str(path) in str(e.value) or "--task-option" in str(e.value)


def test_a_text_task_needs_a_tokenizer(tmp_path):
    data = write_lines(tmp_path / "t.txt", TEXTS[:4])
    with pytest.raises(TaskError, match="needs a tokenizer"):
        load_task(str(data), model="factories:tiny_mlp")
    folder, _ = _folder(tmp_path)
    t = load_task(str(data), model="factories:tiny_mlp", options={"tokenizer": str(folder / "tokenizer.json")})
    assert t.pad_id == 0 and t.metric is None


def test_cli_missing_column_exits_2_with_one_line(tmp_path, capsys):
    folder, _ = _folder(tmp_path)
    bad = tmp_path / "reviews.csv"
    bad.write_text("body,label\ngood,1\nbad,0\nfine,1\n")
    out = tmp_path / "run"
    code = main(["analyze", str(folder), "--task", str(bad), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert str(bad) in err and "column 'text' is missing" in err
    assert not out.exists() or not any(out.iterdir())


# ---- image folders --------------------------------------------------------------------------

def _image(path, size, colour):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_image_folder_is_resized_centre_cropped_normalised_and_labelled_by_sorted_subfolder(tmp_path):
    pytest.importorskip("PIL", reason="Pillow is not installed")
    from PIL import Image

    root = tmp_path / "pets"
    for i in range(3):
        _image(root / "dog" / f"{i}.png", (40 + i, 30), (255, 0, 0))
        _image(root / "cat" / f"{i}.bmp", (30, 50), (0, 0, 255))  # lossless: exact colours
    (root / "cat" / "notes.txt").write_text("not an image")  # other files are not read
    t = load_task(str(root), calib=2)
    assert t.calib_inputs.shape[1:] == (3, 224, 224) and t.calib_inputs.dtype == np.float32
    assert (len(t.calib_inputs), len(t.eval_inputs)) == (2, 4) and t.name == "pets" and t.source == str(root)
    x = np.concatenate([t.calib_inputs, t.eval_inputs])
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    red, blue = (np.array([1, 0, 0]) - mean) / std, (np.array([0, 0, 1]) - mean) / std
    pixel = x[:, :, 100, 100]
    assert all(np.allclose(p, red, atol=1e-5) or np.allclose(p, blue, atol=1e-5) for p in pixel)
    blue_idx = [i for i, p in enumerate(t.eval_inputs[:, :, 0, 0]) if np.allclose(p, blue, atol=1e-5)]
    assert all(t.eval_labels[i] == 0 for i in blue_idx)  # cat before dog
    assert set(t.eval_labels) <= {0, 1}
    # a half black, half white image: the centre crop keeps its middle columns
    root2 = tmp_path / "halves"
    img = Image.new("L", (32, 16), 0)
    img.paste(255, (16, 0, 32, 16))
    for c in ("a", "b"):
        (root2 / c).mkdir(parents=True)
        img.convert("RGB").save(root2 / c / "x.png")
    t2 = load_task(str(root2), calib=1, options={"resize": "16", "crop": "16", "mean": "0,0,0", "std": "1,1,1"})
    row = t2.eval_inputs[0, 0, 8]
    assert t2.eval_inputs.shape[1:] == (3, 16, 16)
    assert np.allclose(row[:8], 0) and np.allclose(row[8:], 1)


@pytest.mark.parametrize("setup, options, message", [
    ("empty class", {}, "class folder holds no images"),
    ("broken image", {}, "not a readable image"),
    ("no classes", {}, "holds no class subfolders"),
    ("ok", {"crop": "300"}, "--task-option crop=300: must be at most resize=256"),
    ("ok", {"mean": "0.5,0.5"}, "expected 3 comma-separated numbers"),
    ("ok", {"size": "3"}, "--task-option size: unknown"),
])
def test_bad_image_folders_name_the_file_or_option(tmp_path, setup, options, message):
    pytest.importorskip("PIL", reason="Pillow is not installed")
    root = tmp_path / "imgs"
    root.mkdir()
    if setup != "no classes":
        _image(root / "a" / "1.png", (8, 8), (1, 2, 3))
        _image(root / "a" / "2.png", (8, 8), (1, 2, 3))
    else:
        (root / "loose.png").write_bytes(b"")
    if setup == "empty class":
        (root / "b").mkdir()
    if setup == "broken image":
        (root / "b").mkdir()
        (root / "b" / "x.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(TaskError) as e:
        load_task(str(root), options=options)
    assert message in str(e.value) and "\n" not in str(e.value)


# ---- causal-LM metrics ----------------------------------------------------------------------

def _lm_case():
    g = torch.Generator().manual_seed(0)
    y_ref = torch.randn(3, 5, 7, generator=g)
    y = y_ref + 0.3 * torch.randn(3, 5, 7, generator=g)
    ids = torch.randint(0, 7, (3, 6), generator=g)
    labels = ids.clone()
    labels[1, 3:] = IGNORE_INDEX  # three real tokens
    labels[2, 1:] = IGNORE_INDEX  # one real token: nothing to predict
    return y, y_ref, labels  # labels one column longer than the batch: as a batch cut to its longest text


def test_perplexity_is_exp_of_mean_next_token_cross_entropy_over_real_tokens():
    y, y_ref, labels = _lm_case()
    ppl, loss, kl = get_metric("perplexity").per_sample(y, y_ref, labels)
    for i, n_real in enumerate((5, 3, 1)):
        ce = [F.cross_entropy(y[i, t].double(), labels[i, t + 1]) for t in range(n_real - 1) if t + 1 < 5]
        want = torch.stack(ce).mean() if ce else torch.tensor(0.0, dtype=torch.float64)
        torch.testing.assert_close(loss[i], want)
        torch.testing.assert_close(ppl[i], want.exp())
    assert kl[0] > 0 and kl[2] == 0
    m = get_metric("perplexity")
    assert not m.higher_is_better and m.needs_labels


def test_next_token_agreement_counts_real_positions_only():
    y, y_ref, labels = _lm_case()
    agree, loss, kl = get_metric("next_token_agreement").per_sample(y, y_ref, labels)
    same = (y.argmax(-1) == y_ref.argmax(-1)).double()
    for i, n_real in enumerate((5, 3, 1)):
        torch.testing.assert_close(agree[i], same[i, :n_real].mean())
    assert torch.equal(loss, kl) and (kl >= 0).all()
    st = MetricState("next_token_agreement")
    st.update(y_ref, y_ref, labels)
    assert st.result()["metric"] == 1.0 and st.result()["kl"] == pytest.approx(0.0, abs=1e-12)
