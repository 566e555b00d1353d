"""Serving without Ray: the decoding loop, reasoning/answer split, request checks, auth, config,
which students are served, and the Serve config file (tests/test_serve.py runs the real server)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import yaml

from ftcot_ray.config import load_config
from ftcot_ray.errors import ConfigError, InputMissing, StageInputMissing
from ftcot_ray.serve import protocol as p
from ftcot_ray.serve.auth import bearer, key_check
from ftcot_ray.serve.engine import RowSpec, abort, new_states, run_rows, step_states
from ftcot_ray.serve.reasoning import ReasoningStream, TextStream, reasoning_prefix, split_output
from ftcot_ray.student.card import read_card
from ftcot_ray.student.data import prompt_ids
from ftcot_ray.student.export import export_untrained
from ftcot_ray.student.generate import generate_one, load_student

from helpers_eval import coin_questions, corpus

REPO = Path(__file__).resolve().parents[1]
TEXTS = corpus() + [" The coin starts heads up. Ann flips it, so it is tails up. --> no",
                    " Bob holds it, and it is heads up. --> yes"] * 40


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("students")
    return {
        "gpt2": export_untrained(root / "gpt2", TEXTS, arch="gpt2", weight_scale=4.0, eos_boost=3.0,
                                 dataset="last_letters_synth"),
        "t5": export_untrained(root / "t5", TEXTS, arch="t5", weight_scale=4.0, eos_boost=3.0,
                               dataset="last_letters_synth", method="vanilla"),
    }


@pytest.fixture(scope="module", params=["gpt2", "t5"])
def student(request, folders):
    return load_student(folders[request.param]), read_card(folders[request.param])


def _ids(student, card, n, seed=1):
    return [prompt_ids(student.tokenizer, card.prompt(q["question"]), student.family)
            for q in coin_questions(n, seed=seed)]


# --------------------------------------------------------------------------- the decoding loop


def test_batched_greedy_equals_alone_and_eval_reference(student):
    st, card = student
    ids = _ids(st, card, 14)
    assert len({len(i) for i in ids}) > 3, "prompts must differ in length so the batch really pads"
    limits = [6 + 5 * (k % 4) for k in range(len(ids))]  # rows with their own max_tokens
    batched = run_rows(st, [RowSpec(i, m) for i, m in zip(ids, limits)])
    alone = [run_rows(st, [RowSpec(i, m)])[0] for i, m in zip(ids, limits)]
    assert [b.ids for b in batched] == [a.ids for a in alone]
    assert [b.finish_reason for b in batched] == [a.finish_reason for a in alone]
    # The same text `ftcot eval`'s per-example reference writes.
    qs = coin_questions(14, seed=1)
    ref = [generate_one(st, card.prompt(q["question"]), max_new_tokens=m).text for q, m in zip(qs, limits)]
    assert [st.tokenizer.decode(b.ids, skip_special_tokens=True) for b in batched] == ref
    reasons = {b.finish_reason for b in batched}
    assert reasons == {"stop", "length"}, reasons  # rows left the batch early and others ran to the limit
    for b, m in zip(batched, limits):
        assert len(b.ids) <= m and (b.finish_reason == "stop") == (b.ids[-1] == st.tokenizer.eos_token_id)


def test_sampling_is_seeded_per_row_whoever_shares_the_batch(student):
    st, card = student
    ids = _ids(st, card, 4)
    sampled = RowSpec(ids[0], 12, temperature=1.5, top_p=0.9, seed=11)
    alone = run_rows(st, [sampled])[0].ids
    mixed = run_rows(st, [RowSpec(ids[1], 12), sampled, RowSpec(ids[2], 5, temperature=1.0, seed=3)])
    assert mixed[1].ids == alone
    assert mixed[0].ids == run_rows(st, [RowSpec(ids[1], 12)])[0].ids  # greedy neighbour unaffected
    draws = {tuple(run_rows(st, [RowSpec(ids[0], 12, temperature=1.5, seed=s)])[0].ids) for s in range(6)}
    assert len(draws) > 1


def test_aborted_rows_leave_the_batch(student):
    st, card = student
    ids = _ids(st, card, 3)
    states = new_states([RowSpec(i, 20) for i in ids])
    steps = step_states(st, states)
    next(steps)
    abort(states[:1])
    produced = [t for step in steps for t in step[:1]]
    assert all(t is None for t in produced)
    assert states[0].finish_reason == "abort" and len(states[0].ids) == 1
    assert all(s.finish_reason in ("stop", "length") for s in states[1:])


def test_top_p_keeps_the_nucleus():
    import torch

    from ftcot_ray.serve.engine import _top_p

    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = torch.isfinite(_top_p(logits, 0.75))
    assert kept.tolist() == [True, True, False, False]
    assert torch.isfinite(_top_p(logits, 0.01)).tolist() == [True, False, False, False]


# --------------------------------------------------------------------------- reasoning and answer


def test_split_output_uses_the_card(folders):
    ft = read_card(folders["gpt2"])  # ft_cot, letters
    assert split_output(ft, " Ann ends in n. Bob ends in b. --> nb") == ("Ann ends in n. Bob ends in b.", "nb")
    assert split_output(ft, " no marker here") == ("no marker here", None)  # ftcot eval: wrong, no answer
    van = read_card(folders["t5"])  # vanilla
    assert split_output(van, "nb") == (None, "nb")


@pytest.mark.parametrize("text", [
    " The coin is heads. --> yes", "a - -- ---> b", " a -->", "  spaced   out  --> x", "no marker at all  ",
    "-->", " ---->-->", "x -", "tail - -", "é ü --> ñ",
])
def test_reasoning_stream_adds_up_to_the_whole(text):
    rng = random.Random(len(text))
    for _ in range(20):  # random cut points: every way the text can arrive in pieces
        cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(0, 6)))) + [len(text)]
        rs, sent = ReasoningStream("-->"), ""
        for c in cuts:
            sent += rs.delta(text[:c], final=c == len(text))
        assert sent == reasoning_prefix(text, "-->", final=True)
        assert "-->" not in sent


def test_text_stream_holds_incomplete_utf8(folders):
    st = load_student(folders["gpt2"])
    ids = st.tokenizer("é ü ñ --> yes", add_special_tokens=False)["input_ids"]
    ts, out = TextStream(st.tokenizer), ""
    for k in range(1, len(ids) + 1):
        piece = ts.delta(ids[:k], final=k == len(ids))
        assert "\ufffd" not in piece
        out += piece
    assert out == st.tokenizer.decode(ids, skip_special_tokens=True) == "é ü ñ --> yes"


# --------------------------------------------------------------------------- requests


def chat(**kw):
    return {"model": "m", "messages": [{"role": "user", "content": "Is it heads?"}], **kw}


@pytest.mark.parametrize("body, param, code", [
    (chat(max_tokens=0), "max_tokens", "invalid_value"),
    (chat(max_tokens="10"), "max_tokens", "invalid_type"),
    (chat(max_tokens=True), "max_tokens", "invalid_type"),
    (chat(n=2), "n", "invalid_value"),  # greedy choices would all be equal
    (chat(temperature=2.5), "temperature", "invalid_value"),
    (chat(top_p=0), "top_p", "invalid_value"),
    (chat(stream="yes"), "stream", "invalid_type"),
    (chat(stream_options={"include_usage": True}), "stream_options", "invalid_value"),
    (chat(stream=True, stream_options={"include_usage": 1}), "stream_options.include_usage", "invalid_type"),
    (chat(frobnicate=1), "frobnicate", "unknown_parameter"),
    (chat(stop=["\n"]), "stop", "unsupported_parameter"),
    (chat(logprobs=True), "logprobs", "unsupported_parameter"),
    (chat(tools=[{"type": "function"}]), "tools", "unsupported_parameter"),
    (chat(presence_penalty=0.5), "presence_penalty", "unsupported_parameter"),
    (chat(vote="yes"), "vote", "invalid_type"),
    (chat(max_tokens=5, max_completion_tokens=6), "max_completion_tokens", "invalid_value"),
    ({"messages": [{"role": "user", "content": "q"}]}, "model", "missing_required_parameter"),
    ({"model": "m"}, "messages", "missing_required_parameter"),
    ({"model": "m", "messages": []}, "messages", "invalid_value"),
    ({"model": "m", "messages": [{"role": "wizard", "content": "q"}]}, "messages[0].role", "invalid_value"),
    ({"model": "m", "messages": [{"role": "user"}]}, "messages[0].content", "missing_required_parameter"),
    ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages[0].content", "invalid_type"),
])
def test_bad_chat_requests_name_the_field(body, param, code):
    with pytest.raises(p.APIError) as e:
        p.parse_request(body, "chat")
    assert (e.value.status, e.value.param, e.value.code) == (400, param, code)
    assert e.value.message.startswith(param)
    assert set(e.value.body()["error"]) == {"message", "type", "param", "code"}


def test_accepted_defaults_and_question():
    req = p.parse_request(chat(stop=None, logprobs=False, presence_penalty=0, user="u-1", n=3, temperature=0.7,
                               seed=4, vote=True, stream=True, stream_options={"include_usage": True}), "chat")
    assert (req.n, req.temperature, req.vote, req.stream_options.include_usage) == (3, 0.7, True, True)
    sys_then_user = {"model": "m", "messages": [{"role": "system", "content": "be brief"},
                                                {"role": "user", "content": [{"type": "text", "text": "Q?"}]}]}
    assert p.question_of(p.parse_request(sys_then_user, "chat")) == ("Q?", "messages[1].content")
    for bad in ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]):
        with pytest.raises(p.APIError, match="one question"):
            p.question_of(p.parse_request({"model": "m", "messages": bad}, "chat"))
    with pytest.raises(p.APIError) as e:
        p.question_of(p.parse_request({"model": "m", "prompt": "   "}, "completions"))
    assert e.value.param == "prompt"
    with pytest.raises(p.APIError) as e:
        p.parse_request({"model": "m", "prompt": [1, 2, 3]}, "completions")
    assert e.value.param.startswith("prompt")
    with pytest.raises(p.APIError, match="one question per request"):
        p.parse_request({"model": "m", "prompt": ["a", "b"]}, "completions")


@pytest.mark.parametrize("raw, code", [(b"{", "invalid_json"), (b"\xff\xfe{}", "invalid_encoding"),
                                       (b"[1, 2]", "invalid_json"), (b"", "invalid_json")])
def test_bad_bodies(raw, code):
    with pytest.raises(p.APIError) as e:
        p.parse_body(raw, 1000)
    assert (e.value.status, e.value.code) == (400, code)
    with pytest.raises(p.APIError) as e:
        p.parse_body(b" " * 2000, 1000)
    assert e.value.status == 413


def test_vote_is_evals_majority(folders):
    rules = read_card(folders["gpt2"]).rules
    assert p.vote_summary(["ab", None, "cd", "ab"], rules) == {"answer": "ab", "count": 2, "n": 4,
                                                              "answers": ["ab", None, "cd", "ab"]}
    assert p.vote_summary([None, None], rules)["answer"] is None


def test_sse_framing():
    assert p.sse({"a": 1}) == b'data: {"a":1}\n\n'
    assert p.sse("[DONE]") == b"data: [DONE]\n\n"


# --------------------------------------------------------------------------- auth


def test_key_check_compares_digests(monkeypatch):
    monkeypatch.setenv("FTCOT_UNIT_KEY", "s3cret-value")
    check = key_check("FTCOT_UNIT_KEY")
    assert check.ok("s3cret-value") and not check.ok("s3cret-valuf") and not check.ok(None)
    assert b"s3cret" not in check.digest and "s3cret" not in repr(check)
    assert bearer("Bearer abc") == "abc" and bearer("bearer  abc ") == "abc"
    assert bearer("Basic abc") is None and bearer(None) is None and bearer("Bearer ") is None
    monkeypatch.delenv("FTCOT_UNIT_KEY")
    assert key_check("FTCOT_UNIT_KEY") is None  # the replica reads it itself
    with pytest.raises(ConfigError, match="FTCOT_UNIT_KEY is not set"):
        key_check("FTCOT_UNIT_KEY", required=True)
    assert key_check(None) is None


# --------------------------------------------------------------------------- config


def test_serve_config_fields_are_runtime_and_validated():
    from ftcot_ray.config import ServeConfig, ServedStudentFormat

    for model in (ServeConfig, ServedStudentFormat):
        for name, f in model.model_fields.items():
            assert (f.json_schema_extra or {}).get("runtime"), f"serve field {name} must be runtime(...)"
    cfg = load_config("quickstart", ["serve.students={coin: runs/x, ma: {path: /m, family: encoder-decoder, "
                                     "method: ft_cot, dataset: multiarith}}"])
    assert cfg.serve.students["coin"] == "runs/x" and cfg.serve.students["ma"].dataset == "multiarith"
    for bad, where in [("serve.min_replicas=3", "serve.max_replicas"), ("serve.max_batch_size=128", "max_ongoing"),
                       ("serve.port=0", "serve.port"), ("serve.route_prefix=v1", "route_prefix"),
                       ("serve.students={'a b': x}", "model id"), ("serve.students={a: 'registry:'}", "registry")]:
        with pytest.raises(ConfigError, match=where):
            load_config("quickstart", [bad])
    pasted = "sk-proj-AbCdEf0123456789XyZ0123456789"
    with pytest.raises(ConfigError) as e:
        load_config("quickstart", [f"serve.api_key_env={pasted}"])
    assert pasted not in str(e.value) and "serve.api_key_env" in str(e.value)


# --------------------------------------------------------------------------- which students


def _cfg(tmp_path, *overrides):
    return load_config("quickstart", [f"run_dir={tmp_path / 'run'}", *overrides])


def test_named_folders_registry_and_explicit_format(tmp_path, folders):
    import shutil

    from ftcot_ray.serve.students import resolve

    plain = tmp_path / "plain"
    shutil.copytree(folders["t5"], plain)
    (plain / "ftcot_student.json").unlink()  # a Hugging Face folder without a card
    best = tmp_path / "run" / "best" / "last_letters_synth"
    shutil.copytree(folders["gpt2"], best)
    cfg = _cfg(tmp_path, f"serve.students={{g: {folders['gpt2']}, best: 'registry:last_letters_synth', "
                         f"p: {{path: {plain}, family: encoder-decoder, method: ft_cot, dataset: multiarith}}}}")
    served, missing = resolve(cfg)
    assert missing == [] and [m.id for m in served] == ["g", "best", "p"]
    assert served[1].folder == str(best.resolve()) and served[1].card_source == "card"
    p_card = served[2].card
    assert (served[2].card_source, p_card.family, p_card.method, p_card.rules.kind, p_card.answer_marker) == \
        ("serve.students", "encoder-decoder", "ft_cot", "number_exact", "-->")

    def fails(value, err, match):
        with pytest.raises(err, match=match):
            resolve(_cfg(tmp_path, f"serve.students={{x: {value}}}"))

    fails(str(plain), ConfigError, "has no student card")
    fails(f"{{path: {plain}, family: decoder, method: ft_cot, dataset: multiarith}}", ConfigError,
          "is an encoder-decoder model")
    fails(f"{{path: {folders['gpt2']}, method: vanilla}}", ConfigError, "card disagrees")
    fails(str(tmp_path / "nowhere"), InputMissing, "does not exist")
    fails("'registry:gsm8k'", StageInputMissing, "no student registered")
    fails(f"{{path: {plain}, family: encoder-decoder, method: ft_cot, dataset: not_a_task}}", ConfigError,
          "serve.students.x.dataset")


def test_run_students_by_readable_id_and_missing_ones(tmp_path, folders):
    import shutil

    from ftcot_ray.artifacts import finish, stage_dir
    from ftcot_ray.serve.students import resolve
    from ftcot_ray.stages.pipeline import variants

    cfg = _cfg(tmp_path)
    with pytest.raises(StageInputMissing, match="no trained student to serve"):
        resolve(cfg)
    label, c = variants(cfg)[1]  # Fine-tune-CoT D=4: the only one trained
    out = stage_dir(c, "train")
    shutil.copytree(folders["gpt2"], out / "student")
    finish(out, c, "train", summary={})
    served, missing = resolve(cfg)
    assert [m.id for m in served] == ["coin_flip_synth-ft_cot-d4"]
    assert served[0].folder == str((out / "student").resolve())
    assert [m["id"] for m in missing] == ["coin_flip_synth-ft_cot-d1", "coin_flip_synth-vanilla"]
    assert all("train stage" in m["why"] for m in missing)


# --------------------------------------------------------------------------- application args, config file


def test_build_app_args_and_the_serve_config_file(tmp_path, folders, monkeypatch):
    from ray.serve.schema import ServeDeploySchema

    from ftcot_ray.serve.app import build_app, config_from_args, deployment_name

    cfg = config_from_args({"config": "quickstart", "overrides": "serve.max_n=4 serve.port=9000",
                            "serve.students": {"a": str(folders["gpt2"])}, "serve.max_batch_size": "8"})
    assert (cfg.serve.max_n, cfg.serve.port, cfg.serve.max_batch_size, cfg.serve.students) == \
        (4, 9000, 8, {"a": str(folders["gpt2"])})
    with pytest.raises(ConfigError, match="unknown argument 'colour'"):
        config_from_args({"colour": "blue"})
    doc = yaml.safe_load((REPO / "cluster" / "serve_config.yaml").read_text())
    ServeDeploySchema.model_validate(doc) if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(doc)
    spec = doc["applications"][0]
    assert spec["import_path"] == "ftcot_ray.serve.app:build_app"
    monkeypatch.delenv("FTCOT_SERVE_KEY", raising=False)
    args = dict(spec["args"], **{"serve.students": {"coin": str(folders["gpt2"]), "t5": str(folders["t5"])}})
    app = build_app(args)  # builds without Ray; the ingress will read FTCOT_SERVE_KEY on its node
    assert type(app).__name__ == "Application"
    assert deployment_name("org/model:v1") != deployment_name("org_model_v1")
    assert deployment_name("org/model:v1").startswith("student-org_model_v1-")


# --------------------------------------------------------------------------- the batcher


def _fake_batches(log: list, steps: int = 3, fail_on: str | None = None):
    """A run_batch that records each batch's jobs and yields `steps` updates per job, then StopAsyncIteration."""
    import asyncio

    async def run_batch(jobs):
        log.append([j["name"] for j in jobs])
        for step in range(steps):
            await asyncio.sleep(0.01)  # a forward pass: requests keep arriving meanwhile
            if fail_on in [j["name"] for j in jobs]:
                raise RuntimeError(f"{fail_on} broke the batch")
            yield [f"{j['name']}:{step}" for j in jobs]
        yield [StopAsyncIteration for _ in jobs]

    return run_batch


def _collect(batcher, job):
    async def go():
        return [u async for u in batcher.submit(job)]
    return go()


def test_jobs_that_queue_while_a_batch_runs_form_the_next_batch_together():
    import asyncio

    from ftcot_ray.serve.batcher import Batcher

    async def main():
        log: list = []
        b = Batcher(_fake_batches(log), max_rows=8, wait_s=0.0, rows_of=lambda j: j["rows"])
        first = asyncio.create_task(_collect(b, {"name": "a", "rows": 1}))
        await asyncio.sleep(0.005)  # "a" is decoding alone; five more arrive one by one meanwhile
        rest = []
        for name in "bcdef":
            rest.append(asyncio.create_task(_collect(b, {"name": name, "rows": 1})))
            await asyncio.sleep(0.002)
        out = await asyncio.gather(first, *rest)
        return log, out

    log, out = asyncio.run(main())
    # @serve.batch would have cut these arrivals into several small batches; here they wait together
    assert log == [["a"], ["b", "c", "d", "e", "f"]]
    assert out[0] == ["a:0", "a:1", "a:2"] and out[3] == ["d:0", "d:1", "d:2"]


def test_a_batch_holds_at_most_max_rows_and_a_larger_job_runs_alone():
    import asyncio

    from ftcot_ray.serve.batcher import Batcher

    async def main():
        log: list = []
        b = Batcher(_fake_batches(log, steps=1), max_rows=4, wait_s=0.02, rows_of=lambda j: j["rows"])
        jobs = [{"name": "x", "rows": 3}, {"name": "y", "rows": 2}, {"name": "z", "rows": 6}, {"name": "w", "rows": 1}]
        await asyncio.gather(*(_collect(b, j) for j in jobs))
        return log

    assert asyncio.run(main()) == [["x"], ["y"], ["z"], ["w"]]  # 3+2 > 4; 6 > 4 alone; then w


def test_a_failed_batch_fails_its_requests_only_and_the_next_batch_is_served():
    import asyncio

    from ftcot_ray.serve.batcher import Batcher

    async def main():
        log: list = []
        b = Batcher(_fake_batches(log, fail_on="bad"), max_rows=1, wait_s=0.0)
        bad = asyncio.create_task(_collect(b, {"name": "bad"}))
        good = asyncio.create_task(_collect(b, {"name": "good"}))
        return await asyncio.gather(bad, good, return_exceptions=True)

    bad, good = asyncio.run(main())
    assert isinstance(bad, RuntimeError) and "bad broke the batch" in str(bad)
    assert good == ["good:0", "good:1", "good:2"]
