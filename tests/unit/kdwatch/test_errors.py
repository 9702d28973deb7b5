"""kdwatch's errors keep their fields through pickling (a worker process or thread pool hands them back)."""

from __future__ import annotations

import pickle

from kdwatch.errors import ConfigError, ContractError


def test_contract_and_config_errors_survive_pickling() -> None:
    contract = pickle.loads(pickle.dumps(ContractError("missing_field", "row 7: missing_field")))
    assert (contract.reason, contract.message, str(contract)) == ("missing_field", "row 7: missing_field", "row 7: missing_field")
    config = pickle.loads(pickle.dumps(ConfigError("KDWATCH_GRACE", "not a duration")))
    assert (config.field, str(config)) == ("KDWATCH_GRACE", "KDWATCH_GRACE: not a duration")
