# METADATA
# title: Model release gate — robust accuracy per recipient
# description: |
#   Part of the model_release gate: policy data may set, per recipient and purpose, a minimum
#   accuracy under attack for each budget the release step measures
#   (data.factory.release_robustness[recipient][purpose] = {"fgsm@0.1": 0.5, ...}; keys are
#   `clean`, `fgsm@<eps>`, `pgd@<eps>` of conf/protection.yaml). Input (optional):
#   model.robustness = {evaluated, accuracy: {key: number}, reason}. A release for which a
#   minimum is set is denied when the figure is missing (not evaluated, or not at that budget) or
#   below the minimum; without a minimum, model.robustness is not read.
package factory.model_release

import rego.v1

# METADATA
# description: The minimum robust accuracy per budget for this recipient and purpose ({} when policy data sets none).
robustness_minimums := m if {
	m := data.factory.release_robustness[input.recipient][input.purpose]
	is_object(m)
} else := {}

# METADATA
# description: The measured accuracy per budget ({} when not measured or not an object).
robustness_measured := a if {
	a := input.model.robustness.accuracy
	is_object(a)
} else := {}

# METADATA
# description: Why a figure is missing: the evaluation's own reason when it gives one.
robustness_missing_reason := r if {
	r := input.model.robustness.reason
	is_string(r)
} else := "not measured at this budget"

# METADATA
# description: Robust accuracy missing or below the recipient's minimum.
deny contains msg if {
	well_formed
	some key, minimum in robustness_minimums
	not is_number(robustness_measured[key])
	msg := sprintf("robust accuracy %s of model %s is missing (%s); the %s minimum for %s is %v", [
		key, model.id, robustness_missing_reason, input.purpose, input.recipient, minimum,
	])
}

deny contains msg if {
	well_formed
	some key, minimum in robustness_minimums
	value := robustness_measured[key]
	is_number(value)
	value < minimum
	msg := sprintf("robust accuracy %s of model %s is %v, below the %s minimum %v for %s", [
		key, model.id, value, input.purpose, minimum, input.recipient,
	])
}
