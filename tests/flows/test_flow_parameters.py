"""Flow parameters carry their limits into the form Prefect's UI shows, and a run with a value outside them is refused
before anything starts (Prefect ignores limits given as `param = Field(default, ge=...)`; `Annotated` keeps them)."""

from __future__ import annotations

import pytest
from prefect.exceptions import ParameterTypeError
from prefect.utilities.callables import parameter_schema

from flows.end_to_end import end_to_end
from flows.evaluation_flows import evaluate, generate
from flows.training_flows import sft, train

CASES = [
    (train, "nproc_per_node", 1, 0),
    (train, "retries", 0, -1),
    (sft, "nproc_per_node", 1, 0),
    (evaluate, "max_batches", 1, 0),
    (evaluate, "max_new_tokens", 1, 0),
    (generate, "max_new_tokens", 1, 0),
    (end_to_end, "train_steps", 2, 1),
    (end_to_end, "eval_prompts", 0, -1),
]


@pytest.mark.parametrize(("flow", "name", "minimum", "bad"), CASES, ids=[f"{c[0].name}-{c[1]}" for c in CASES])
def test_limits_are_in_the_form_and_enforced(flow, name: str, minimum: int, bad: int) -> None:
    schema = parameter_schema(flow.fn).model_dump()
    assert schema["properties"][name]["minimum"] == minimum
    assert schema["properties"][name]["description"]  # the form explains each field
    with pytest.raises(ParameterTypeError, match=name):
        flow.validate_parameters({name: bad})


def test_required_parameters_stay_required_and_defaults_stay() -> None:
    schema = parameter_schema(evaluate.fn).model_dump()
    assert {"checkpoint", "out_dir"} <= set(schema["required"])
    assert schema["properties"]["max_batches"]["default"] == 8
    assert parameter_schema(train.fn).model_dump()["properties"]["retries"]["default"] == 2
