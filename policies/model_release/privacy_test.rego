# METADATA
# title: Tests of the model release gate's differential-privacy budgets
package factory.model_release_privacy_test

import rego.v1

import data.factory.model_release

supplier_source := {
	"dataset_id": "supplier/train@1", "owner": "supplier", "local_only": false,
	"export_authorized": true, "releasable_to": ["origin", "destination"], "dp": null,
}

origin_source(dp) := {
	"dataset_id": "supplier/origin-shared@2", "owner": "origin", "local_only": false,
	"export_authorized": false, "releasable_to": ["supplier", "destination"], "dp": dp,
}

release(lineage) := {
	"model": {
		"id": "digits-cnn-m6/1",
		"site": "supplier",
		"metrics": {"supplier_test": 0.95},
		"watermark": {"verified": false},
		"signature": {"verified": true},
		"lineage": lineage,
	},
	"recipient": "destination",
	"purpose": "collaboration",
	"requested_by": "supplier_platform",
	"approvals": [],
}

budgets := {"origin": {"supplier/origin-shared": {"epsilon": 8, "delta": 1e-5}, "*": {"epsilon": 1, "delta": 1e-6}}}

spent(epsilon, delta) := {"epsilon": epsilon, "delta": delta}

has_reason(d, fragment) if {
	some r in d.reasons
	contains(r, fragment)
}

test_allows_a_spend_within_the_budget if {
	d := model_release.decision with input as release([supplier_source, origin_source(spent(7.5, 1e-5))])
		with data.factory.privacy_budgets as budgets
	d.allow
}

test_allows_anything_without_budgets if {
	d := model_release.decision with input as release([supplier_source, origin_source(null)])
		with data.factory.privacy_budgets as {}
	d.allow
}

test_allows_an_unbudgeted_owner_trained_without_dp if {
	# the supplier's own source has no budget: dp null is fine
	d := model_release.decision with input as release([supplier_source, origin_source(spent(2, 1e-6))])
		with data.factory.privacy_budgets as budgets
	d.allow
}

test_allows_any_spend_when_the_model_goes_to_the_owner if {
	d := model_release.decision with input as object.union(release([supplier_source, origin_source(null)]), {"recipient": "origin"})
		with data.factory.privacy_budgets as budgets
	d.allow
}

test_denies_an_epsilon_above_the_budget_naming_dataset_owner_spent_and_allowed if {
	d := model_release.decision with input as release([supplier_source, origin_source(spent(8.25, 1e-5))])
		with data.factory.privacy_budgets as budgets
	not d.allow
	count(d.reasons) == 1
	# deltas print as 1e-05 (OPA) or 0.00001 (regorus): the test names the rest
	has_reason(d, "lineage source supplier/origin-shared@2 of origin spends epsilon 8.25, delta ")
	has_reason(d, "; origin allows epsilon 8, delta ")
}

test_denies_a_delta_above_the_budget if {
	d := model_release.decision with input as release([origin_source(spent(1, 2e-5))])
		with data.factory.privacy_budgets as budgets
	not d.allow
	has_reason(d, "supplier/origin-shared@2 of origin spends epsilon 1, delta ")
}

test_denies_training_without_dp_on_a_budgeted_source if {
	d := model_release.decision with input as release([supplier_source, origin_source(null)])
		with data.factory.privacy_budgets as budgets
	not d.allow
	count(d.reasons) == 1
	has_reason(d, "lineage source supplier/origin-shared@2 of origin was trained on without differential privacy (no bound); origin allows epsilon 8, delta ")
}

test_denies_a_source_without_dp_key_as_unbounded if {
	entry := object.remove(origin_source(null), ["dp"])
	d := model_release.decision with input as release([entry])
		with data.factory.privacy_budgets as budgets
	not d.allow
	has_reason(d, "without differential privacy")
}

test_the_owner_default_applies_to_other_datasets if {
	raw := object.union(origin_source(spent(2, 1e-6)), {"dataset_id": "origin/shared@1"})
	d := model_release.decision with input as release([raw])
		with data.factory.privacy_budgets as budgets
	not d.allow
	has_reason(d, "origin/shared@1 of origin spends epsilon 2, delta ")
	has_reason(d, "origin allows epsilon 1, delta ")
}

test_an_exact_id_budget_comes_before_the_versionless_one if {
	exact := {"origin": {"supplier/origin-shared@2": {"epsilon": 10, "delta": 1e-5}, "supplier/origin-shared": {"epsilon": 1, "delta": 1e-5}}}
	d := model_release.decision with input as release([origin_source(spent(9, 1e-5))])
		with data.factory.privacy_budgets as exact
	d.allow
}

test_denies_a_malformed_budget if {
	d := model_release.decision with input as release([origin_source(spent(1, 1e-6))])
		with data.factory.privacy_budgets as {"origin": {"*": {"epsilon": "8"}}}
	not d.allow
	has_reason(d, "the privacy budget origin sets for supplier/origin-shared@2 is not {epsilon, delta} numbers")
}

test_denies_a_malformed_spend_as_unbounded if {
	d := model_release.decision with input as release([origin_source({"epsilon": "1"})])
		with data.factory.privacy_budgets as budgets
	not d.allow
	has_reason(d, "without differential privacy")
}

test_shipped_policy_data_sets_no_budget if {
	count(data.factory.privacy_budgets) == 0
}
