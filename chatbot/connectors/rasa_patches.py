"""One fix to Rasa 3.6.21, applied when the Rasa server loads the patient channel
(``connectors.patient`` imports this module).

``RemoteAction._validate_action_result`` checks every action server response with
``jsonschema.validate(result, schema)``, which first checks the *schema* itself against its
metaschema, on every call: a third of the Rasa server's time per message under load (py-spy,
bench/chatbot.py). The replacement checks the schema once and validates each response against
it as before: the same schema, the same error (``best_match``, as ``jsonschema.validate``).
"""

from __future__ import annotations

from typing import Any

import jsonschema
from jsonschema.exceptions import best_match
from rasa.core.actions.action import RemoteAction

_SCHEMA = RemoteAction.action_response_format_spec()
_VALIDATOR_CLASS = jsonschema.validators.validator_for(_SCHEMA)
_VALIDATOR_CLASS.check_schema(_SCHEMA)
_VALIDATOR = _VALIDATOR_CLASS(_SCHEMA)


def validate_action_result(_action: RemoteAction, result: dict[str, Any]) -> bool:
    """``RemoteAction._validate_action_result`` with the schema checked once."""
    error = best_match(_VALIDATOR.iter_errors(result))
    if error is not None:
        error.message += (
            ". Failed to validate Action server response from API, make sure your response "
            "from the Action endpoint is valid."
        )
        raise error
    return True


RemoteAction._validate_action_result = validate_action_result  # type: ignore[method-assign]
