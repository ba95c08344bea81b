# METADATA
# title: Tests of the model release gate's membership-inference audit limits
package factory.model_release_owner_audit_test

import rego.v1

import data.factory.model_release

digest := "sha256:1111111111111111111111111111111111111111111111111111111111111111"

release := {
	"model": {
		"id": "digits-cnn-m5-default/1",
		"site": "supplier",
		"digest": digest,
		"metrics": {"supplier_test": 0.97},
		"watermark": {"verified": false},
		"signature": {"verified": true},
		"lineage": [
			{
				"dataset_id": "supplier/train@1", "owner": "supplier", "local_only": false,
				"export_authorized": true, "releasable_to": ["origin", "destination"],
			},
			{
				"dataset_id": "supplier/origin-export@2", "owner": "origin", "local_only": false,
				"export_authorized": true, "releasable_to": ["supplier", "destination"],
			},
		],
	},
	"recipient": "origin",
	"purpose": "collaboration",
	"requested_by": "supplier_platform",
	"approvals": [],
}

limits := {"origin": {"collaboration": {"auc": 0.7, "tpr_at_1pct_fpr": 0.2}}}

audit(figures) := object.union({"owner": "origin", "model_digest": digest, "attack": "loss-threshold"}, figures)

audited(audits) := object.union(release, {"model": {"membership_audits": audits}})

test_allows_an_audit_within_the_limits if {
	d := model_release.decision with input as audited([audit({"auc": 0.62, "tpr_at_1pct_fpr": 0.05})])
		with data.factory.membership_audits as limits
	d.allow
}

test_allows_an_audit_at_the_limits if {
	d := model_release.decision with input as audited([audit({"auc": 0.7, "tpr_at_1pct_fpr": 0.2})])
		with data.factory.membership_audits as limits
	d.allow
}

test_allows_no_audit_when_no_limit_is_set if {
	d := model_release.decision with input as release with data.factory.membership_audits as {}
	d.allow
}

test_allows_another_purpose_than_the_limit_names if {
	d := model_release.decision with input as object.union(release, {"purpose": "review"})
		with data.factory.membership_audits as limits
	d.allow
}

test_allows_when_the_limiting_owner_has_no_data_in_the_model if {
	d := model_release.decision with input as release
		with data.factory.membership_audits as {"destination": {"collaboration": {"auc": 0.5}}}
	d.allow
}

test_denies_a_missing_audit_naming_owner_and_limit if {
	d := model_release.decision with input as release with data.factory.membership_audits as limits
	not d.allow
	d.reasons == [sprintf(
		"model digits-cnn-m5-default/1 holds data of origin, whose collaboration policy requires its membership-inference audit of this model (digest %s) within %v; none was given",
		[digest, {"auc": 0.7, "tpr_at_1pct_fpr": 0.2}],
	)]
}

test_denies_an_audit_above_a_limit if {
	d := model_release.decision with input as audited([audit({"auc": 0.81, "tpr_at_1pct_fpr": 0.05})])
		with data.factory.membership_audits as limits
	not d.allow
	d.reasons == ["membership-inference audit of model digits-cnn-m5-default/1 by origin: auc 0.81 is above the collaboration limit 0.7"]
}

test_denies_an_audit_of_another_model if {
	other := object.union(audit({"auc": 0.5, "tpr_at_1pct_fpr": 0.0}), {"model_digest": "sha256:22"})
	d := model_release.decision with input as audited([other])
		with data.factory.membership_audits as limits
	not d.allow
	contains(d.reasons[0], "requires its membership-inference audit of this model")
}

test_denies_an_audit_by_another_owner if {
	other := object.union(audit({"auc": 0.5, "tpr_at_1pct_fpr": 0.0}), {"owner": "supplier"})
	d := model_release.decision with input as audited([other])
		with data.factory.membership_audits as limits
	not d.allow
	contains(d.reasons[0], "holds data of origin")
}

test_denies_when_the_released_model_names_no_digest if {
	doc := object.union(audited([audit({"auc": 0.5, "tpr_at_1pct_fpr": 0.0})]), {"model": {"digest": null}})
	d := model_release.decision with input as doc with data.factory.membership_audits as limits
	not d.allow
}

test_denies_an_audit_without_a_limited_figure if {
	d := model_release.decision with input as audited([audit({"auc": 0.5})])
		with data.factory.membership_audits as limits
	not d.allow
	d.reasons == ["membership-inference audit of model digits-cnn-m5-default/1 by origin gives no tpr_at_1pct_fpr; the collaboration limit is 0.2"]
}

test_denies_when_any_of_several_audits_of_the_model_exceeds if {
	audits := [audit({"auc": 0.5, "tpr_at_1pct_fpr": 0.0}), audit({"auc": 0.5, "tpr_at_1pct_fpr": 0.3})]
	d := model_release.decision with input as audited(audits) with data.factory.membership_audits as limits
	not d.allow
}

test_denies_audits_that_are_not_a_list if {
	doc := object.union(release, {"model": {"membership_audits": {"owner": "origin"}}})
	d := model_release.decision with input as doc with data.factory.membership_audits as limits
	not d.allow
}
