"""Serving: ``DIN.score_candidates``, ``din.Scorer``, ``din score``, ``din export`` and the exported programs
(torch.export and AOTInductor) loaded in a fresh process; the eval-mode Dice op that makes them possible."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import din
import din_kernels as dk
from din.cli import main
from din.data.dataset import Batch
from din.model import ModelConfig, build_model
from din.serve import (ScoringProgram, example_inputs, export_program, load_program,
                       max_difference, save_program)

ROOT = Path(__file__).resolve().parents[1]
GOODS, CATES, USERS = 60, 9, 11


def trained_like(config: ModelConfig, seed: int = 0) -> torch.nn.Module:
    """A model of ``config`` whose BatchNorm and Dice running statistics and weights are not their initial
    values (a few training-mode forwards), in eval mode."""
    torch.manual_seed(seed)
    model = build_model(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
        model.train()
        for _ in range(3):
            batch, seq_len = 64, 12
            users = torch.randint(1, USERS, (batch,)) if config.use_user else torch.zeros(batch, dtype=torch.long)
            model(Batch(users, torch.randint(1, GOODS, (batch, seq_len)), torch.randint(1, CATES, (batch, seq_len)),
                        torch.randint(0, seq_len + 1, (batch,)), torch.randint(1, GOODS, (batch,)),
                        torch.randint(1, CATES, (batch,)), torch.zeros(batch)))
    return model.eval()


def config(**changes) -> ModelConfig:
    values = dict(num_goods=GOODS, num_cates=CATES, num_users=USERS, attention_normalize="softmax",
                  attention_scale=36 ** -0.5, embedding_init="torch")
    values.update(changes)
    return ModelConfig(**values)


def repeated_batch(hist_goods, hist_cates, lengths, goods, cates, user):
    """The [B * C] batch that copies each history once per candidate: what ``forward`` scores."""
    count = goods.shape[1]
    return Batch(user.repeat_interleave(count), hist_goods.repeat_interleave(count, 0),
                 hist_cates.repeat_interleave(count, 0), lengths.repeat_interleave(count), goods.reshape(-1),
                 cates.reshape(-1), torch.zeros(goods.numel()))


# ---------------------------------------------------------------------------------------------------------
# DIN.score_candidates
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("changes", [
    {},                                                               # the default: Dice head, softmax
    {"use_user": True, "attention_normalize": "none", "attention_scale": None},
    {"activation": "prelu", "attention_activation": "dice", "head_input_norm": False, "product_term": False},
    {"model": "base", "use_user": True},
    {"history_search": "category", "search_top_k": 3},               # a history per candidate: repeated
], ids=["default", "user-none", "prelu-dice-unit", "base-user", "category-search"])
@pytest.mark.parametrize("shape", [(3, 12, 5), (1, 1, 1), (2, 7, 1), (1, 9, 40)], ids=lambda s: "B%dT%dC%d" % s)
def test_score_candidates_equals_forward_on_repeated_histories(changes, shape):
    model = trained_like(config(**changes))
    batch, seq_len, count = shape
    inputs = example_inputs(model.config, batch, seq_len, count, generator=torch.Generator().manual_seed(3))
    hist_goods, hist_cates, lengths, goods, cates, user = inputs
    lengths[0] = 0  # an empty history among them
    with torch.no_grad():
        ours = model.score_candidates(hist_goods, hist_cates, lengths, goods, cates, user)
        expected = model(repeated_batch(*inputs)).view(batch, count)
    assert ours.shape == (batch, count)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)
    assert count * batch == 1 or expected.std() > 0  # a model whose scores differ between candidates


def test_score_candidates_rejects_mismatched_shapes():
    model = trained_like(config(use_user=True))
    hist = torch.ones(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"goods and cates must both be \[B, C\] with B=2"):
        model.score_candidates(hist, hist, torch.tensor([4, 4]), torch.ones(3, 2, dtype=torch.long),
                               torch.ones(3, 2, dtype=torch.long), torch.ones(2, dtype=torch.long))
    with pytest.raises(ValueError, match="pass user"):
        model.score_candidates(hist, hist, torch.tensor([4, 4]), torch.ones(2, 3, dtype=torch.long),
                               torch.ones(2, 3, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------------
# din.Scorer
# ---------------------------------------------------------------------------------------------------------

def test_scorer_equals_the_models_probabilities_and_keeps_the_latest_behaviours():
    model = trained_like(config())
    scorer = din.Scorer(model, max_len=6)
    history = torch.randint(1, GOODS, (10,)), torch.randint(1, CATES, (10,))
    candidates = torch.stack([torch.randint(1, GOODS, (7,)), torch.randint(1, CATES, (7,))], dim=1)
    scores = scorer.score(*history, candidates)
    assert scores.dtype == torch.float32 and scores.shape == (7,)
    inputs = (history[0][None, -6:], history[1][None, -6:], torch.tensor([6]), candidates[:, 0][None],
              candidates[:, 1][None], torch.zeros(1, dtype=torch.long))
    with torch.no_grad():
        expected = torch.sigmoid(model(repeated_batch(*inputs)))
    torch.testing.assert_close(scores, expected, atol=1e-6, rtol=1e-5)
    # lists and numpy arrays are ids too; without max_len every behaviour is read, which changes the scores
    torch.testing.assert_close(scorer.score(history[0].tolist(), history[1].numpy(), candidates.tolist()), scores)
    assert not torch.allclose(din.Scorer(model).score(*history, candidates), scores)
    # an empty history and no candidates are answers, not errors
    assert scorer.score([], [], candidates).shape == (7,)
    assert scorer.score(*history, []).shape == (0,)


@pytest.mark.parametrize("args,kwargs,error,message", [
    (([1, 0], [1, 1], [[5, 1]]), {}, ValueError, r"history_items\[1\] = 0 is not an item id .*padding.*1\.\.59"),
    (([1], [1, 2], [[5, 1]]), {}, ValueError, "one entry per behaviour, got 1 and 2"),
    (([1.0], [1], [[5, 1]]), {}, TypeError, "history_items must hold integer ids, got dtype torch.float32"),
    (([True], [1], [[5, 1]]), {}, TypeError, "history_items must hold integer ids, got dtype torch.bool"),
    (([[1, 2]], [1], [[5, 1]]), {}, ValueError, r"history_items must be \[T\], got shape \(1, 2\)"),
    (([1], [9], [[5, 1]]), {}, ValueError, r"history_categories\[0\] = 9 is not a category id .*1\.\.8"),
    (([1], [1], [[5, 1, 2]]), {}, ValueError, r"candidates must be \[C, 2\]"),
    (([1], [1], [[5, 1], [60, 1]]), {}, ValueError, r"candidates\[1\] item = 60 is not an item id"),
    (([1], [1], [[5, -1]]), {}, ValueError, r"candidates\[0\] category = -1 is not a category id"),
    (("ab", [1], [[5, 1]]), {}, TypeError, "history_items must be integer ids"),
    (([1], [1], [[5, 1]]), {"user": None}, ValueError, "reads the user id .*pass user"),
    (([1], [1], [[5, 1]]), {"user": 11}, ValueError, r"user = 11 is not a user id of this model: its user ids are 1\.\.10"),
    (([1], [1], [[5, 1]]), {"user": 2.0}, TypeError, "user must hold integer ids"),
])
def test_scorer_rejects_bad_input_before_the_model_runs(monkeypatch, args, kwargs, error, message):
    model = trained_like(config(use_user=True))
    scorer = din.Scorer(model)
    monkeypatch.setattr(model, "score_candidates", lambda *a, **k: pytest.fail("the model ran"))
    with pytest.raises(error, match=message):
        scorer.score(*args, user=kwargs.get("user", 3))


def test_scorer_reads_the_user_only_where_the_model_has_one():
    with_user = din.Scorer(trained_like(config(use_user=True)))
    history, candidates = ([3, 4, 5], [1, 2, 3]), [[7, 1], [8, 2]]
    assert not torch.allclose(with_user.score(*history, candidates, user=1), with_user.score(*history, candidates, user=2))
    without = din.Scorer(trained_like(config()))
    torch.testing.assert_close(without.score(*history, candidates, user=1), without.score(*history, candidates))
    with pytest.raises(ValueError, match="max_len must be a positive int"):
        din.Scorer(without.model, max_len=0)
    with pytest.raises(TypeError, match="din model"):
        din.Scorer(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------------------------
# din score / din export on a checkpoint written by din train
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "run"
    assert main(["train", "--data", "synthetic", "--epochs", "1", "--batch-size", "512", "--max-len", "20",
                 "--out", str(out), "--quiet"]) == 0
    return out / "model.pt"


REQUESTS = [
    {"id": "r1", "history_items": [3, 9, 4], "history_categories": [1, 2, 1], "candidates": [[12, 2], [40, 1]]},
    {"user": 17, "history_items": list(range(1, 31)), "history_categories": [5] * 30,
     "candidates": [[i, i % 20 + 1] for i in range(100, 140)]},
    {"id": 7, "history_items": [], "history_categories": [], "candidates": [[1, 1]]},
]


def write_lines(path: Path, lines) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_din_score_writes_the_scorers_probabilities(checkpoint, tmp_path, capsys):
    requests = write_lines(tmp_path / "requests.jsonl", [json.dumps(REQUESTS[0]), "", *map(json.dumps, REQUESTS[1:])])
    out = tmp_path / "scores.jsonl"
    assert main(["score", "--checkpoint", str(checkpoint), "--input", str(requests), "--out", str(out)]) == 0
    assert "scored 3 requests (43 candidates)" in capsys.readouterr().out
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in records] == [1, 3, 4] and [r.get("id") for r in records] == ["r1", None, 7]
    scorer = din.Scorer.from_checkpoint(checkpoint)
    assert scorer.max_len == 20  # the checkpoint's training --max-len: request 2's 30 behaviours are cut
    for record, request in zip(records, REQUESTS):
        expected = scorer.score(request["history_items"], request["history_categories"], request["candidates"])
        assert record["scores"] == pytest.approx(expected.tolist(), rel=1e-6, abs=1e-7)
    # without --out the same lines go to standard output
    assert main(["score", "--checkpoint", str(checkpoint), "--input", str(requests)]) == 0
    assert capsys.readouterr().out.splitlines() == out.read_text().splitlines()
    # --max-len 0 reads every behaviour: request 2's scores change, and equal a Scorer without a limit
    assert main(["score", "--checkpoint", str(checkpoint), "--input", str(requests), "--max-len", "0"]) == 0
    full = json.loads(capsys.readouterr().out.splitlines()[1])["scores"]
    request = REQUESTS[1]
    unlimited = din.Scorer.from_checkpoint(checkpoint, max_len=None)
    assert full == pytest.approx(unlimited.score(request["history_items"], request["history_categories"],
                                                 request["candidates"]).tolist(), rel=1e-6, abs=1e-7)
    assert full != records[1]["scores"]


@pytest.mark.parametrize("line,message", [
    ('{"history_items": [3], "history_categories": [1], "candidates": [[12, 2]]', "not a JSON object: Expecting ',' delimiter"),
    ('[1, 2]', r"expected a JSON object \{...\}, got list"),
    ('{"history_items": [3], "history_categorie": [1], "candidates": [[12, 2]]}', "unknown key 'history_categorie'"),
    ('{"history_items": [3], "candidates": [[12, 2]]}', "missing key 'history_categories'"),
    ('{"history_items": [3.5], "history_categories": [1], "candidates": [[12, 2]]}', r"history_items\[0\] is 3.5, not an integer id"),
    ('{"history_items": [3], "history_categories": [true], "candidates": [[12, 2]]}', r"history_categories\[0\] is true"),
    ('{"history_items": [3], "history_categories": [1], "candidates": [[12]]}', r"candidates\[0\] is \[12\], not an \[item, category\] pair"),
    ('{"history_items": [3], "history_categories": [1], "candidates": [[12, 2], [99999, 2]]}', r"candidates\[1\] item = 99999 is not an item id"),
    ('{"history_items": [3], "history_categories": [1], "candidates": [[12, 2]], "user": "u1"}', 'user is "u1", not an integer id'),
    ('{"history_items": [3], "history_categories": [1], "candidates": [[12, 2]], "id": [1]}', "id must be a string or a number"),
])
def test_din_score_bad_lines_are_one_line_errors_naming_the_line(checkpoint, tmp_path, capsys, line, message):
    good = json.dumps(REQUESTS[0])
    requests = write_lines(tmp_path / "requests.jsonl", [good, good, line, good])
    out = tmp_path / "scores.jsonl"
    out.write_text("previous\n")
    assert main(["score", "--checkpoint", str(checkpoint), "--input", str(requests), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {requests}:3: ")
    assert __import__("re").search(message, err), err
    assert out.read_text() == "previous\n"  # nothing scored, the old file intact, no temporary left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["requests.jsonl", "scores.jsonl"]


def test_din_score_refuses_bad_files(checkpoint, tmp_path, capsys):
    empty = write_lines(tmp_path / "empty.jsonl", ["", "  "])
    assert main(["score", "--checkpoint", str(checkpoint), "--input", str(empty)]) == 2
    assert "holds no requests" in capsys.readouterr().err
    assert main(["score", "--checkpoint", str(checkpoint), "--input", str(tmp_path / "missing.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "binary.jsonl").write_bytes(json.dumps(REQUESTS[0]).encode() + b'\n\xff\xfe\n')
    assert main(["score", "--checkpoint", str(checkpoint), "--input", str(tmp_path / "binary.jsonl")]) == 2
    assert "binary.jsonl:2: not UTF-8 text" in capsys.readouterr().err
    assert main(["score", "--checkpoint", str(checkpoint), "--input", str(empty), "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


# a fresh interpreter: nothing of this process (op registrations, caches) helps it
FRESH = textwrap.dedent("""
    import sys
    import torch
    import din_kernels  # registers torch.ops.din_kernels.*, which the programs call
    inputs = torch.load(sys.argv[1])
    outputs = {}
    outputs["export"] = [torch.export.load(sys.argv[2]).module()(*case) for case in inputs]
    if len(sys.argv) > 4:
        # loaded directly, a package reads its inputs with contiguous strides: hand it contiguous ones
        package = torch._inductor.aoti_load_package(sys.argv[4])
        outputs["aoti"] = [package(*(t.contiguous() for t in case)) for case in inputs]
        from din.serve import load_program
        outputs["aoti via load_program"] = [load_program(sys.argv[4])(*case) for case in inputs]
    torch.save(outputs, sys.argv[3])
""")


def run_fresh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", FRESH, *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)


def test_exported_programs_reproduce_the_eager_scores_in_a_fresh_process(checkpoint, tmp_path, capsys):
    program, package = tmp_path / "program.pt2", tmp_path / "package.pt2"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(program), "--aoti", str(package)]) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "AOTInductor" in printed
    scorer = din.Scorer.from_checkpoint(checkpoint, max_len=None)
    config = scorer.config
    # other sizes than the export's example (B, T, C dynamic), one request as the Scorer sends it, T = 1
    generator = torch.Generator().manual_seed(5)
    cases = [example_inputs(config, 1, 50, 100, generator), example_inputs(config, 3, 7, 2, generator),
             example_inputs(config, 2, 1, 9, generator)]
    request = REQUESTS[1]
    history = torch.tensor([request["history_items"], request["history_categories"]])
    pairs = torch.tensor(request["candidates"])
    # as Scorer.score_checked passes them: the candidates are column slices (strided)
    cases.append((history[:1], history[1:], torch.tensor([30]), pairs[:, 0][None], pairs[:, 1][None],
                  torch.tensor([17])))
    torch.save(cases, tmp_path / "inputs.pt")
    result = run_fresh(str(tmp_path / "inputs.pt"), str(program), str(tmp_path / "outputs.pt"), str(package))
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = torch.load(tmp_path / "outputs.pt")
    with torch.no_grad():
        expected = [ScoringProgram(scorer.model)(*case) for case in cases]
    for kind in ("export", "aoti", "aoti via load_program"):
        for got, want in zip(outputs[kind], expected):
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    scores = scorer.score(request["history_items"], request["history_categories"], request["candidates"])
    torch.testing.assert_close(outputs["export"][-1][0], scores, atol=1e-5, rtol=0)


def test_a_program_needs_din_kernels_imported(checkpoint, tmp_path):
    program = save_program(export_program(din.Scorer.from_checkpoint(checkpoint).model), tmp_path / "p.pt2")
    result = subprocess.run([sys.executable, "-c", f"import torch; torch.export.load({str(program)!r})"],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode != 0 and "din_kernels" in result.stderr


def test_export_refuses_bad_outputs(checkpoint, tmp_path, capsys):
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "program.pt")]) == 2
    assert "must end in .pt2" in capsys.readouterr().err
    same = str(tmp_path / "p.pt2")
    assert main(["export", "--checkpoint", str(checkpoint), "--out", same, "--aoti", same]) == 2
    assert "two different files" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("changes", [{"use_user": True}, {"model": "base", "activation": "prelu"},
                                     {"attention_activation": "dice", "attention_normalize": "none",
                                      "attention_scale": None}], ids=["user", "base-prelu", "dice-unit"])
def test_export_program_is_dynamic_and_equals_eager(changes, tmp_path):
    model = trained_like(config(**changes))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    program = load_program(save_program(export_program(model), tmp_path / "p.pt2"))
    for shape in [(1, 1, 1), (4, 13, 6), (1, 200, 30)]:
        inputs = example_inputs(model.config, *shape, generator=torch.Generator().manual_seed(sum(shape)))
        assert max_difference(program, model, inputs) <= 1e-6
    # export froze a copy: the model keeps its values and can still train
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_the_model_compiles_as_one_graph_in_eval_mode():
    """torch.compile(fullgraph=True) of the default model (Dice head): the Dice and attention custom ops
    stay single nodes, the embedding lookups are the tables' own."""
    torch._dynamo.reset()
    model = trained_like(config())
    program = ScoringProgram(model)
    compiled = torch.compile(program, fullgraph=True, backend="aot_eager")
    inputs = example_inputs(model.config, 3, 8, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(compiled(*inputs), program(*inputs), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# the eval-mode Dice op, din_kernels::dice_eval
# ---------------------------------------------------------------------------------------------------------

def dice_layer(channels: int, affine: bool, alpha_per_channel: bool = True) -> dk.Dice:
    layer = dk.Dice(channels, affine=affine)
    with torch.no_grad():
        layer.alpha.copy_(torch.rand(channels) * 0.5)
        layer.running_mean.copy_(torch.randn(channels))
        layer.running_var.copy_(torch.rand(channels) + 0.5)
        if affine:
            layer.weight.copy_(torch.randn(channels))
            layer.bias.copy_(torch.randn(channels))
    return layer.eval()


@pytest.mark.parametrize("affine", [False, True])
def test_dice_compiles_in_eval_mode_and_keeps_the_eager_results(backend, affine):
    torch._dynamo.reset()
    layer = dice_layer(24, affine)
    x = (torch.randn(37, 24) * 3).requires_grad_(True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    expected = layer(x)
    assert torch.equal(out, expected)  # the same launchers: bit for bit
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, *layer.parameters()], grad)
    want = torch.autograd.grad(expected, [x, *layer.parameters()], grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
    three_d = torch.randn(2, 5, 24)
    torch.testing.assert_close(compiled(three_d), layer(three_d))


@pytest.mark.parametrize("affine,alpha_size", [(False, 24), (True, 1)])
def test_dice_eval_opcheck(affine, alpha_size):
    x = torch.randn(9, 24, dtype=torch.float64, requires_grad=True)
    alpha = torch.rand(alpha_size, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(24, dtype=torch.float64, requires_grad=True) if affine else None
    bias = torch.randn(24, dtype=torch.float64, requires_grad=True) if affine else None
    args = (x, alpha, weight, bias, torch.randn(24, dtype=torch.float64), torch.rand(24, dtype=torch.float64) + 0.5,
            1e-8)
    op = torch.ops.din_kernels.dice_eval
    torch.library.opcheck(op.default, args)
    stats = args[4:]
    if affine:
        torch.autograd.gradcheck(lambda *params: op(*params, *stats), (x, alpha, weight, bias))
    else:
        torch.autograd.gradcheck(lambda x, alpha: op(x, alpha, None, None, *stats), (x, alpha))
    # and the eager layer (DiceFunction) agrees with the op
    layer = dk.Dice(24, affine=affine).double().eval()
    with torch.no_grad():
        layer.alpha.copy_(alpha.detach().expand(24))
        layer.running_mean.copy_(stats[0])
        layer.running_var.copy_(stats[1])
        if affine:
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
        expected = layer(x)
        torch.testing.assert_close(op(x, layer.alpha, layer.weight, layer.bias, *stats), expected, atol=0, rtol=0)


def test_attention_op_takes_none_for_empty_lists():
    """AOTInductor's proxy executor hands an empty Tensor[] to the op as None: the op reads it as empty."""
    unit = dk.LocalActivationUnit(8, (16, 8), normalize="softmax", scale=8 ** -0.5)
    query, keys, lengths = torch.randn(3, 8), torch.randn(3, 5, 8), torch.tensor([0, 5, 2])
    op = torch.ops.din_kernels.din_attention
    options = (1e-8, "concat", "sigmoid", "softmax", 8 ** -0.5)
    with torch.no_grad():
        with_lists = op(query, keys, lengths, list(unit.weights()), [], [], [], *options)
        with_none = op(query, keys, lengths, list(unit.weights()), None, None, None, *options)
        torch.testing.assert_close(with_none[0], with_lists[0], atol=0, rtol=0)
        torch.testing.assert_close(with_none[0], unit(query, keys, lengths), atol=1e-6, rtol=1e-5)


def test_a_searching_model_is_refused_by_export_with_one_clear_error():
    from din.serve import export_program

    model = trained_like(config(history_search="category", search_top_k=3))
    with pytest.raises(ValueError, match="history_search='category' cannot be exported yet"):
        export_program(model)
