"""Test helpers for stateful layers, for this library and for users' own layers."""

from keras_stateful.testing.state_contract import (
    check_state_contract,
    state_snapshot,
    variables_snapshot,
)

__all__ = ["check_state_contract", "state_snapshot", "variables_snapshot"]
