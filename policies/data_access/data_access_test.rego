# METADATA
# title: Tests of the data access gate
package factory.data_access_test

import rego.v1

import data.factory.data_access

base := {
	"subject": {"id": "svc-supplier", "site": "supplier", "roles": ["pipeline"], "clearance": "confidential"},
	"action": "train",
	"purpose": "training",
	"resource": {
		"id": "origin/shared@1",
		"owner": "origin",
		"classification": "confidential",
		"releasable_to": ["supplier"],
		"purposes": ["training", "collaboration"],
	},
}

with_subject(fields) := object.union(base, {"subject": fields})

with_resource(fields) := object.union(base, {"resource": fields})

has_reason(d, fragment) if {
	some r in d.reasons
	contains(r, fragment)
}

test_allows_pipeline_training_on_shared_data if {
	data_access.decision == {"allow": true, "reasons": []} with input as base
}

test_allows_owner_site_without_releasable_to if {
	data_access.decision.allow with input as object.union(
		with_subject({"site": "origin", "id": "svc-origin", "clearance": "secret"}),
		{"resource": {"releasable_to": []}},
	)
}

test_allows_higher_clearance if {
	data_access.decision.allow with input as with_subject({"clearance": "secret"})
}

test_denies_clearance_below_classification if {
	d := data_access.decision with input as with_subject({"clearance": "restricted"})
	not d.allow
	has_reason(d, "clearance restricted, below the classification confidential of dataset origin/shared@1")
}

test_denies_role_without_action if {
	d := data_access.decision with input as object.union(base, {"subject": {"roles": ["auditor"]}})
	not d.allow
	has_reason(d, "no role of subject svc-supplier (auditor) permits action \"train\"")
}

test_allows_engineer_to_read if {
	data_access.decision.allow with input as object.union(base, {"action": "read", "subject": {"roles": ["engineer"]}})
}

test_denies_engineer_export if {
	d := data_access.decision with input as object.union(base, {"action": "export", "subject": {"roles": ["engineer"]}})
	not d.allow
	has_reason(d, "permits action \"export\"")
}

test_denies_unknown_action if {
	d := data_access.decision with input as object.union(base, {"action": "destroy"})
	not d.allow
	has_reason(d, "action \"destroy\"")
}

test_denies_purpose_not_allowed if {
	d := data_access.decision with input as object.union(base, {"purpose": "export"})
	not d.allow
	has_reason(d, "dataset origin/shared@1 may not be used for purpose \"export\"")
}

test_denies_site_not_releasable if {
	d := data_access.decision with input as with_subject({"site": "destination", "id": "svc-destination"})
	not d.allow
	has_reason(d, "dataset origin/shared@1 of origin is not releasable to site destination of subject svc-destination")
}

test_denies_local_only_private_data_to_supplier if {
	d := data_access.decision with input as with_resource({
		"id": "origin/private@1", "classification": "secret", "releasable_to": [],
	})
	not d.allow
	has_reason(d, "not releasable to site supplier")
	has_reason(d, "below the classification secret")
}

test_denies_missing_subject_clearance if {
	d := data_access.decision with input as object.union(base, {"subject": {"clearance": null}})
	not d.allow
	d.reasons == ["required field subject.clearance is missing"]
}

test_denies_unknown_clearance_level if {
	d := data_access.decision with input as with_subject({"clearance": "top-secret"})
	not d.allow
	has_reason(d, "field subject.clearance must be one of public, restricted, confidential, secret, got \"top-secret\"")
}

test_denies_malformed_roles if {
	d := data_access.decision with input as with_subject({"roles": "pipeline"})
	not d.allow
	has_reason(d, "field subject.roles must be an array of strings, got \"pipeline\"")
}

test_denies_missing_resource if {
	d := data_access.decision with input as object.remove(base, ["resource"])
	not d.allow
	has_reason(d, "required field resource.id is missing")
	has_reason(d, "required field resource.classification is missing")
}

test_denies_empty_subject_id if {
	d := data_access.decision with input as with_subject({"id": ""})
	not d.allow
	has_reason(d, "field subject.id must be a non-empty string, got \"\"")
}

test_denies_non_object_input if {
	d := data_access.decision with input as ["not", "an", "object"]
	not d.allow
	has_reason(d, "input must be an object")
}

test_denies_empty_input if {
	d := data_access.decision with input as {}
	not d.allow
	count(d.reasons) == 11
}

test_denies_without_role_actions_data if {
	d := data_access.decision with input as base with data.factory.role_actions as {}
	not d.allow
	has_reason(d, "permits action \"train\"")
}

# An empty site matched an empty entry of releasable_to once; a site must be a non-empty string.
test_denies_empty_subject_site_even_when_releasable_to_holds_it if {
	d := data_access.decision with input as object.union(
		with_subject({"site": ""}),
		{"resource": {"releasable_to": [""]}},
	)
	not d.allow
	d.reasons == ["field subject.site must be a non-empty string, got \"\""]
}
