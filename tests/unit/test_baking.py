"""Prompt baking's parts on a micro model: prompt configs and their errors, the inputs, the KL objective's
alignment of teacher and student, the students' folding, the paired behaviour measures."""
import re

import pytest
import torch
from pydantic import ValidationError

from services.baking.behaviour import changes_behaviour, paired
from services.baking.objective import PromptKL
from services.baking.phase import BakingConfig
from services.baking.prompts import DEFAULT_PROMPTS, PERSONA_PROMPT, TOOL_PROMPT, PromptConfig, dialogue_inputs, next_speech
from services.baking.student import LoraSettings, fold, make_student
from services.baking.trajectories import SamplingConfig, TeacherRow, at_most, check_prompt, input_room, teacher_rows
from shared.data.splits import split_of
from shared.data.tasks import INSTRUCTION, expression_key, make_examples
from shared.evaluation import sampled_continuations
from shared.models import build_model
from shared.ternary.bitlinear import bit_linears, trainable_ternary
from shared.training import collate

pytestmark = pytest.mark.unit


def test_a_bad_prompt_config_is_a_clear_error():
    with pytest.raises(ValidationError, match="empty"):
        PromptConfig(name="tools", kind="tools", text="  \n", tasks=(("requests", 2),))
    with pytest.raises(ValidationError, match="needs tasks"):
        PromptConfig(name="tools", kind="tools", text="use it: ")
    with pytest.raises(ValidationError, match="needs traits"):
        PromptConfig(name="me", kind="persona", text="I am me.\n")
    with pytest.raises(ValidationError, match="regular expression"):
        PromptConfig(name="me", kind="persona", text="I am me.\n", traits=[{"name": "x", "pattern": "(unclosed"}])
    with pytest.raises(ValidationError, match="unknown suite"):
        PromptConfig(name="tools", kind="tools", text="use it: ", tasks=(("no_such_suite", 1),))
    with pytest.raises(ValidationError, match="distinct"):
        BakingConfig(prompts=(TOOL_PROMPT, TOOL_PROMPT))
    with pytest.raises(ValidationError, match="at least one"):
        BakingConfig(prompts=())
    assert BakingConfig().prompts == DEFAULT_PROMPTS


def test_a_prompt_longer_than_the_context_is_refused_before_any_work(micro_bitnet):
    _, tokenizer = micro_bitnet  # context 32
    long_prompt = PromptConfig(name="tools", kind="tools", text="use the calculator: " * 8, tasks=(("requests", 2),))
    with pytest.raises(ValueError, match="more than the model's context of 32 tokens"):
        check_prompt(tokenizer, long_prompt, ["1 plus 2 ?"], SamplingConfig(), context=32)
    check_prompt(tokenizer, TOOL_PROMPT, ["1 plus 2 ?"], SamplingConfig(answer_tokens=2, max_calls=0), context=32)


def test_the_tools_prompt_is_the_instruction_its_requests_lack_and_they_split_as_tool_calls():
    assert TOOL_PROMPT.text == INSTRUCTION
    for request in make_examples("requests", 2, "test", 50):
        a, word, b = re.fullmatch(r"(\d+) (plus|minus|times) (\d+) \?", request.prompt).groups()
        op = {"plus": "+", "minus": "-", "times": "*"}[word]
        assert request.tool_call == f"{a}{op}{b}" and request.key == expression_key(int(a), op, int(b))
        assert split_of(request.key) == "test"  # the calculator request's own problem, in its own split


def test_dialogue_inputs_are_whole_speeches_that_end_where_the_next_begins():
    inputs = dialogue_inputs("validation", 40, seed=0, max_chars=240)
    assert len(set(inputs)) == 40 and inputs == dialogue_inputs("validation", 40, seed=0, max_chars=240)
    for text in inputs:
        assert len(text) <= 240 and text[0].isupper() and text.endswith("\n") and not text.endswith("\n\n")
        assert text.split("\n", 1)[0].endswith(".")  # opens with a speaker's name
    assert next_speech("\nFORGE.\nGood friend.\n\nMIRANDA.\nNo.") == "FORGE.\nGood friend."
    assert PERSONA_PROMPT.traits[0].shown_by("FORGE.\nI am here.") and not PERSONA_PROMPT.traits[0].shown_by("MIRANDA.\nForge on.")


def test_persona_inputs_are_drawn_among_excerpts_that_fit_the_context(micro_bitnet):
    """Characters do not bound tokens: an excerpt too long for the context with its prompt and trajectory
    loses its first speeches (or is left out) instead of failing the phase; when all fit, the draw is unchanged."""
    _, tokenizer = micro_bitnet
    prompt = PromptConfig(name="me", kind="persona", text="FORGE.\nFriend.\n", traits=PERSONA_PROMPT.traits)
    sampling = SamplingConfig(speech_tokens=8)
    fits = at_most(tokenizer, input_room(tokenizer, prompt, sampling, context=200))
    unbounded = dialogue_inputs("validation", 40, seed=0, max_chars=240)
    bounded = dialogue_inputs("validation", 40, seed=0, max_chars=240, fits=fits)
    assert not all(map(fits, unbounded))  # what this test is about happens
    with pytest.raises(ValueError, match="more than the model's context of 200 tokens"):
        check_prompt(tokenizer, prompt, unbounded, sampling, context=200)
    check_prompt(tokenizer, prompt, bounded, sampling, context=200)
    assert len(set(bounded)) == 40
    for text in bounded:
        assert text[0].isupper() and text.endswith("\n") and text.split("\n", 1)[0].endswith(".")  # whole speeches
    assert dialogue_inputs("validation", 40, seed=0, max_chars=240, fits=at_most(tokenizer, 240)) == unbounded


def test_sampling_repeats_with_its_seed_and_needs_a_temperature(micro_bitnet):
    model, tokenizer = micro_bitnet
    prompts = ["1 + 2 =", "3 + 4 ="]
    first = sampled_continuations(model, tokenizer, prompts, 6, temperature=1.0, seed=3, stop_strings=())
    assert first == sampled_continuations(model, tokenizer, prompts, 6, temperature=1.0, seed=3, stop_strings=())
    assert first != sampled_continuations(model, tokenizer, prompts, 6, temperature=1.0, seed=4, stop_strings=())
    with pytest.raises(ValueError, match="temperature"):
        sampled_continuations(model, tokenizer, prompts, 6, temperature=0.0, seed=3)


def test_the_kl_compares_the_prompted_teacher_and_the_unprompted_student_at_the_same_generated_tokens(micro_bitnet):
    """Computed by hand for one row: the teacher reads prompt + input + trajectory, the student input +
    trajectory, and only the trajectory's tokens count."""
    model, tokenizer = micro_bitnet
    student = build_model("tiny", len(tokenizer), 1, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    prompt, text, trajectory = "the cat sat.\n", "1 + 2 =", " 3\n"
    (row,) = teacher_rows(tokenizer, prompt, [text], [trajectory])
    (anchor,) = teacher_rows(tokenizer, "", [text], [trajectory])
    objective = PromptKL(model, {"all": [row]}, {"all": 1.0}, tokenizer.pad_token_id)
    ids = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    p, x, y = len(ids(prompt)), len(ids(text)), len(ids(text + trajectory)) - len(ids(text))
    assert row.prompt_length == p and anchor.prompt_length == 0 and list(anchor) == row[p:]
    with torch.no_grad():
        teacher_logits = model(input_ids=torch.tensor([ids(prompt + text + trajectory)])).logits[0, p + x - 1 : p + x + y - 1]
        student_logits = student(input_ids=torch.tensor([ids(text + trajectory)])).logits[0, x - 1 : x + y - 1]
        log_p, log_q = teacher_logits.log_softmax(-1), student_logits.log_softmax(-1)
        expected = (log_p.exp() * (log_p - log_q)).sum(-1)
        got = objective.kl_per_token(student, [row], *collate([row], tokenizer.pad_token_id))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert objective.mean(student, [row]) == pytest.approx(float(expected.mean()), rel=1e-4)
    assert objective.mean(model, [anchor]) == pytest.approx(0.0, abs=1e-6)  # no prompt: the input matches itself


def test_the_latent_lora_folds_exactly_and_peft_folds_into_plain_ternary_layers(micro_bitnet):
    model, tokenizer = micro_bitnet
    ids = torch.tensor([tokenizer("1 + 2 = 3", add_special_tokens=False)["input_ids"]])
    for kind in ("latent_lora", "peft_lora"):
        student = make_student(trainable_ternary(model), kind, LoraSettings(rank=4, alpha=4.0), seed=0)
        trainable = [p for p in student.parameters() if p.requires_grad]
        assert trainable and all("lora" in name for name, p in student.named_parameters() if p.requires_grad)
        with torch.no_grad():
            for parameter in trainable:
                parameter.normal_(0, 0.5)
            before = student(input_ids=ids).logits
        folded = fold(student, kind)
        assert not any("lora" in name for name, _ in folded.named_parameters())
        assert len(list(bit_linears(folded))) == len(list(bit_linears(model)))
        with torch.no_grad():
            after = folded(input_ids=ids).logits
        if kind == "latent_lora":
            torch.testing.assert_close(after, before)  # the update lived inside the quantizer already
        else:
            assert not torch.allclose(after, before)  # re-ternarized: what the float branch did is not kept


def test_paired_measures_say_better_only_when_the_interval_clears_zero():
    baked = {"calls": [1] * 40 + [0] * 10}
    unbaked = {"calls": [0] * 50}
    differences = paired(baked, unbaked, "unit/calls")
    assert differences["calls"]["difference"] == pytest.approx(0.8) and differences["calls"]["verdict"] == "better"
    assert changes_behaviour(differences)
    same = paired(unbaked, unbaked, "unit/calls")
    assert same["calls"]["verdict"] == "tied" and not changes_behaviour(same)
    with pytest.raises(ValueError, match="paired"):
        paired({"calls": [1]}, unbaked, "unit/calls")


def test_teacher_rows_know_their_prompt_and_leave_only_the_trajectory_predicted(small_corpus):
    tokenizer, _ = small_corpus
    (row,) = teacher_rows(tokenizer, "the cat sat.\n", ["1 + 2 ="], [" 3\n"])
    assert isinstance(row, TeacherRow)
    _, _, predicted = collate([row], tokenizer.pad_token_id)
    generated = len(tokenizer("1 + 2 = 3\n", add_special_tokens=False)["input_ids"]) - len(tokenizer("1 + 2 =", add_special_tokens=False)["input_ids"])
    assert int(predicted.sum()) == generated and predicted[0, -generated:].all()
