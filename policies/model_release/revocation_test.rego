# METADATA
# title: Tests of the model release gate's refusal of revoked models
package factory.model_release_revocation_test

import rego.v1

import data.factory.model_release

release := {
	"model": {
		"id": "digits-cnn-m3/2",
		"site": "supplier",
		"metrics": {"supplier_test": 0.97},
		"watermark": {"verified": false},
		"signature": {"verified": true},
		"lineage": [{
			"dataset_id": "origin/shared@1", "owner": "origin", "local_only": false,
			"export_authorized": false, "releasable_to": ["supplier"],
		}],
	},
	"recipient": "origin",
	"purpose": "collaboration",
	"requested_by": "supplier_platform",
	"approvals": [],
}

revoked(record) := object.union(release, {"model": {"revoked": record}})

test_allows_a_model_that_is_not_revoked if {
	d := model_release.decision with input as release with data.factory.release_robustness as {}
	d.allow
}

test_allows_a_null_revocation if {
	d := model_release.decision with input as revoked(null) with data.factory.release_robustness as {}
	d.allow
}

test_denies_a_revoked_model_naming_the_revocation if {
	d := model_release.decision with input as revoked({
		"revocation_id": "rev-1", "dataset": "origin/shared@1", "owner": "origin",
		"replaced_by": "digits-cnn-m3/3", "at": "2026-12-05T12:00:00Z",
	})
		with data.factory.release_robustness as {}
	not d.allow
	d.reasons == [concat("", [
		"model digits-cnn-m3/2 is revoked (revocation rev-1: dataset origin/shared@1 withdrawn by origin; ",
		"replaced by digits-cnn-m3/3); it is released to no one",
	])]
}

test_denies_a_revoked_model_not_yet_replaced if {
	d := model_release.decision with input as revoked({"revocation_id": "rev-1", "dataset": "origin/shared@1",
		"owner": "origin", "replaced_by": null})
		with data.factory.release_robustness as {}
	not d.allow
	contains(d.reasons[0], "replaced by unknown")
}

test_denies_a_malformed_revocation if {
	d := model_release.decision with input as revoked("yes") with data.factory.release_robustness as {}
	not d.allow
	contains(d.reasons[0], "revocation unknown")
}

test_denies_a_revoked_export if {
	doc := object.union(revoked({"revocation_id": "rev-2"}), {"purpose": "export", "recipient": "destination"})
	d := model_release.decision with input as doc
	not d.allow
	some r in d.reasons
	contains(r, "revocation rev-2")
}
