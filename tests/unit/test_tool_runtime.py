"""The calculator and the tool runtime: calls executed during generation, results appended, the final answer
scored; malformed or oversized calls give error results, never exceptions."""
from __future__ import annotations

import pytest
import torch

from shared.calculator import MAX_CALL_CHARS, evaluate_calc, execute, parse_calc, worked_call
from shared.data.tasks import make_examples
from shared.models import Preset, build_model
from shared.tokenizer import train_tokenizer
from shared.tool_runtime import Transcript, greedy_with_tools, run_with_tools

pytestmark = pytest.mark.unit


def test_calculator_parses_and_evaluates_only_integer_arithmetic():
    assert parse_calc("no call here") is None
    assert parse_calc("I will call <calc> 2+3 </calc> now") == "2+3"
    assert evaluate_calc("12*(3-5)+-2") == -26
    for bad in ("2**10", "1/2", "__import__('os')", "x+1", "1.5*2", "", "3 +", "1\x00"):
        with pytest.raises(ValueError, match="not a calculator expression"):
            evaluate_calc(bad)
    with pytest.raises(ValueError, match=f"at most {MAX_CALL_CHARS} characters"):
        evaluate_calc("1+" * 40 + "1")
    with pytest.raises(ValueError, match="more than 18 digits"):
        evaluate_calc("999999999999*999999999999")
    assert execute("2+3") == "5" and execute("2+").startswith("error: not a calculator expression")
    assert worked_call("2+3") == "<calc>2+3</calc><result>5</result>"


class Scripted:
    """A generator that answers each prompt from a script: the first rule whose key the prompt ends with wins.
    It writes past its stop strings on purpose, as a batch of real generations can."""

    def __init__(self, rules: dict[str, str]) -> None:
        self.rules, self.calls = rules, []

    def __call__(self, prompts, max_new_tokens, stops):
        self.calls.append((list(prompts), list(stops)))
        return [next(text for end, text in self.rules.items() if prompt.endswith(end)) for prompt in prompts]


def test_a_call_is_executed_its_result_appended_and_the_final_answer_scored():
    generate = Scripted({"12 plus 53 ?": " <calc>12+53</calc><result>999</result> 999\n",
                         "</result>": " 65\nand then some", "7 + 1 =": " 8\nnext"})
    with_call, without = run_with_tools(generate, ["use the calculator: 12 plus 53 ?", "7 + 1 ="], max_new_tokens=8)
    # The model's own guess at the result is cut off: the runtime's result follows the call.
    assert with_call == Transcript(" <calc>12+53</calc><result>65</result> 65\n", ("12+53",), ("65",))
    assert with_call.final_answer == "65" and with_call.made_well_formed_call
    assert without == Transcript(" 8\n") and without.final_answer == "8" and not without.made_well_formed_call
    # Round two continues only the prompt that called, from its transcript so far.
    assert generate.calls[1][0] == ["use the calculator: 12 plus 53 ? <calc>12+53</calc><result>65</result>"]


@pytest.mark.parametrize(("call", "error"), [
    ("<calc>12+</calc>", "not a calculator expression"),
    ("<calc>__import__('os').system('x')</calc>", "not a calculator expression"),
    ("<calc>" + "9" * (MAX_CALL_CHARS + 1) + "</calc>", f"at most {MAX_CALL_CHARS} characters"),
    ("</calc>", "not a calculator expression: ''"),  # a close with nothing opened
])
def test_a_malformed_or_oversized_call_gets_an_error_result(call, error):
    generate = Scripted({"?": " " + call, "</result>": " 0\n"})
    (transcript,) = run_with_tools(generate, ["q ?"], max_new_tokens=8)
    assert len(transcript.results) == 1 and transcript.results[0].startswith("error: ")
    assert error in transcript.results[0] and f"<result>{transcript.results[0]}</result> 0\n" in transcript.text
    assert not transcript.made_well_formed_call and transcript.final_answer == "0"


def test_at_most_max_calls_are_executed_then_the_model_must_answer():
    generate = Scripted({"": " <calc>1+1</calc>"})
    (transcript,) = run_with_tools(generate, ["q ?"], max_new_tokens=8, max_calls=2)
    assert transcript.calls == ("1+1", "1+1") and transcript.results == ("2", "2")
    assert [stops for _, stops in generate.calls] == [["\n", "</calc>"], ["\n", "</calc>"], ["\n"]]
    assert transcript.text.endswith("<result>2</result> <calc>1+1</calc>")  # the third call stays text


def test_greedy_generation_with_tools_runs_on_a_real_model():
    examples = make_examples("tool_calls", 2, "test", 6)
    tokenizer = train_tokenizer([e.prompt for e in examples] * 20, vocab_size=512, model_max_length=64)
    shape = Preset(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, vocab_size=512, max_positions=64)
    model = build_model(shape, len(tokenizer), 0, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.set_num_threads(1)
    transcripts = greedy_with_tools(model, tokenizer, [e.prompt for e in examples], max_new_tokens=6, batch_size=4)
    assert len(transcripts) == 6 and all(isinstance(t.text, str) for t in transcripts)
    assert transcripts == greedy_with_tools(model, tokenizer, [e.prompt for e in examples], max_new_tokens=6, batch_size=6)
