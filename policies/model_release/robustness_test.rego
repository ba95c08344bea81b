# METADATA
# title: Tests of the model release gate's robust-accuracy minimums
package factory.model_release_robustness_test

import rego.v1

import data.factory.model_release

release := {
	"model": {
		"id": "digits-cnn/3",
		"site": "supplier",
		"metrics": {"supplier_test": 0.97},
		"watermark": {"verified": false},
		"signature": {"verified": true},
		"lineage": [{
			"dataset_id": "supplier/train@1", "owner": "supplier", "local_only": false,
			"export_authorized": true, "releasable_to": ["origin", "destination"],
		}],
	},
	"recipient": "origin",
	"purpose": "collaboration",
	"requested_by": "supplier_platform",
	"approvals": [],
}

minimum := {"origin": {"collaboration": {"fgsm@0.1": 0.5, "pgd@0.05": 0.6}}}

measured(accuracy) := object.union(release, {"model": {"robustness": {"evaluated": true, "accuracy": accuracy}}})

has_reason(d, fragment) if {
	some r in d.reasons
	contains(r, fragment)
}

test_allows_robust_accuracy_above_the_minimum if {
	d := model_release.decision with input as measured({"clean": 0.98, "fgsm@0.1": 0.7, "pgd@0.05": 0.9})
		with data.factory.release_robustness as minimum
	d.allow
}

test_allows_robust_accuracy_at_the_minimum if {
	d := model_release.decision with input as measured({"fgsm@0.1": 0.5, "pgd@0.05": 0.6})
		with data.factory.release_robustness as minimum
	d.allow
}

test_allows_no_robustness_when_no_minimum_is_set if {
	d := model_release.decision with input as release with data.factory.release_robustness as {}
	d.allow
}

test_allows_another_recipient_or_purpose_than_the_minimum_names if {
	d := model_release.decision with input as object.union(release, {"recipient": "destination"})
		with data.factory.release_robustness as minimum
	d.allow
}

test_denies_robust_accuracy_below_the_minimum if {
	d := model_release.decision with input as measured({"fgsm@0.1": 0.49, "pgd@0.05": 0.9})
		with data.factory.release_robustness as minimum
	not d.allow
	d.reasons == ["robust accuracy fgsm@0.1 of model digits-cnn/3 is 0.49, below the collaboration minimum 0.5 for origin"]
}

test_denies_a_budget_that_was_not_measured if {
	d := model_release.decision with input as measured({"fgsm@0.1": 0.9})
		with data.factory.release_robustness as minimum
	not d.allow
	d.reasons == [concat("", [
		"robust accuracy pgd@0.05 of model digits-cnn/3 is missing (not measured at this budget); ",
		"the collaboration minimum for origin is 0.6",
	])]
}

test_denies_a_failed_evaluation_naming_its_reason if {
	doc := object.union(release, {"model": {"robustness": {"evaluated": false, "reason": "no test set"}}})
	d := model_release.decision with input as doc
		with data.factory.release_robustness as minimum
	not d.allow
	count(d.reasons) == 2
	has_reason(d, "fgsm@0.1 of model digits-cnn/3 is missing (no test set)")
}

test_denies_a_release_without_robustness_when_a_minimum_is_set if {
	d := model_release.decision with input as release
		with data.factory.release_robustness as minimum
	not d.allow
	has_reason(d, "pgd@0.05 of model digits-cnn/3 is missing (not measured at this budget)")
}

test_denies_malformed_robustness_as_missing if {
	d := model_release.decision with input as object.union(release, {"model": {"robustness": {"accuracy": [0.9], "reason": 3}}})
		with data.factory.release_robustness as minimum
	not d.allow
	has_reason(d, "fgsm@0.1 of model digits-cnn/3 is missing (not measured at this budget)")
}

test_denies_a_non_numeric_figure_as_missing if {
	d := model_release.decision with input as measured({"fgsm@0.1": "0.9", "pgd@0.05": 0.9})
		with data.factory.release_robustness as minimum
	not d.allow
}
