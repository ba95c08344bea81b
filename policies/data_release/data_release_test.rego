# METADATA
# title: Tests of the data release gate
package factory.data_release_test

import rego.v1

import data.factory.data_release

officer := {"user": "origin_officer", "site": "origin", "roles": ["compliance_officer"], "decision": "approve"}

base := {
	"dataset": {
		"id": "origin/shared@1",
		"owner": "origin",
		"classification": "confidential",
		"local_only": false,
		"sanitization": {"passed": true, "remaining_sensitive_columns": []},
		"validation": {"success": true},
	},
	"recipient": "supplier",
	"requested_by": "origin_engineer",
	"approvals": [officer],
}

with_dataset(fields) := object.union(base, {"dataset": fields})

with_approvals(list) := object.union(base, {"approvals": list})

has_reason(d, fragment) if {
	some r in d.reasons
	contains(r, fragment)
}

test_allows_sanitized_shared_data_to_supplier if {
	data_release.decision == {"allow": true, "reasons": []} with input as base
}

test_allows_with_releasable_to_listing_recipient if {
	data_release.decision.allow with input as with_dataset({"releasable_to": ["supplier"]})
}

test_allows_with_extra_approval_of_other_user if {
	data_release.decision.allow with input as with_approvals([
		officer,
		{"user": "supplier_officer", "site": "supplier", "roles": ["compliance_officer"], "decision": "approve"},
	])
}

test_denies_failed_sanitization if {
	d := data_release.decision with input as with_dataset({"sanitization": {"passed": false}})
	not d.allow
	has_reason(d, "dataset origin/shared@1 did not pass sanitization")
}

test_denies_remaining_sensitive_columns if {
	d := data_release.decision with input as with_dataset({"sanitization": {"remaining_sensitive_columns": ["latitude", "operator"]}})
	not d.allow
	has_reason(d, "dataset origin/shared@1 still holds sensitive columns: latitude, operator")
}

test_denies_failed_validation if {
	d := data_release.decision with input as with_dataset({"validation": {"success": false}})
	not d.allow
	has_reason(d, "dataset origin/shared@1 did not pass validation")
}

test_denies_local_only_dataset if {
	d := data_release.decision with input as with_dataset({"id": "origin/private@1", "local_only": true})
	not d.allow
	has_reason(d, "dataset origin/private@1 is local-only and may never leave origin")
}

test_denies_release_to_owner if {
	d := data_release.decision with input as object.union(base, {"recipient": "origin"})
	not d.allow
	has_reason(d, "recipient origin owns dataset origin/shared@1")
}

test_denies_classification_above_ceiling if {
	d := data_release.decision with input as object.union(base, {"recipient": "destination"})
	not d.allow
	has_reason(d, "dataset origin/shared@1 is confidential, above the restricted ceiling for releases from origin to destination")
}

test_allows_restricted_subset_to_destination if {
	data_release.decision.allow with input as object.union(
		with_dataset({"id": "origin/export_authorized@1", "classification": "restricted"}),
		{"recipient": "destination"},
	)
}

test_denies_recipient_without_agreement if {
	d := data_release.decision with input as object.union(base, {"recipient": "elsewhere"})
	not d.allow
	has_reason(d, "no release of origin data to elsewhere is agreed")
}

test_denies_recipient_not_in_releasable_to if {
	d := data_release.decision with input as with_dataset({"releasable_to": ["destination"]})
	not d.allow
	has_reason(d, "dataset origin/shared@1 is not releasable to supplier (releasable to: destination)")
}

test_denies_malformed_releasable_to if {
	d := data_release.decision with input as with_dataset({"releasable_to": "supplier"})
	not d.allow
	has_reason(d, "field dataset.releasable_to must be an array of sites")
}

test_denies_without_approvals if {
	d := data_release.decision with input as with_approvals([])
	not d.allow
	has_reason(d, "no approval by a compliance_officer of origin other than the requester origin_engineer")
}

test_denies_self_approval if {
	d := data_release.decision with input as object.union(with_approvals([officer]), {"requested_by": "origin_officer"})
	not d.allow
	has_reason(d, "origin_officer approved their own request")
	has_reason(d, "no approval by a compliance_officer of origin")
}

test_denies_officer_of_wrong_site if {
	d := data_release.decision with input as with_approvals([
		{"user": "destination_officer", "site": "destination", "roles": ["compliance_officer"], "decision": "approve"},
	])
	not d.allow
	has_reason(d, "no approval by a compliance_officer of origin")
}

test_denies_approval_without_officer_role if {
	d := data_release.decision with input as with_approvals([
		{"user": "origin_platform", "site": "origin", "roles": ["platform_operator"], "decision": "approve"},
	])
	not d.allow
	has_reason(d, "no approval by a compliance_officer of origin")
}

test_denies_rejection_among_approvals if {
	d := data_release.decision with input as with_approvals([
		officer,
		{"user": "origin_auditor", "site": "origin", "roles": ["auditor"], "decision": "reject"},
	])
	not d.allow
	d.reasons == ["origin_auditor (origin) rejected the request"]
}

test_denies_missing_sanitization if {
	d := data_release.decision with input as object.union(base, {"dataset": {"sanitization": null}})
	not d.allow
	has_reason(d, "required field dataset.sanitization.passed is missing")
	has_reason(d, "required field dataset.sanitization.remaining_sensitive_columns is missing")
}

test_denies_malformed_local_only if {
	d := data_release.decision with input as with_dataset({"local_only": "no"})
	not d.allow
	d.reasons == ["field dataset.local_only must be true or false, got \"no\""]
}

test_denies_missing_approvals if {
	d := data_release.decision with input as object.remove(base, ["approvals"])
	not d.allow
	d.reasons == ["required field approvals is missing"]
}

test_denies_approvals_not_a_list if {
	d := data_release.decision with input as object.union(base, {"approvals": "origin_officer"})
	not d.allow
	d.reasons == ["field approvals must be an array, got \"origin_officer\""]
}

test_denies_malformed_approval_entry if {
	d := data_release.decision with input as with_approvals([officer, "yes", {"user": "x", "site": "origin", "roles": [], "decision": "maybe"}])
	not d.allow
	has_reason(d, "approvals[1] must be an object, got \"yes\"")
	has_reason(d, "field approvals[2].decision must be \"approve\" or \"reject\", got \"maybe\"")
}

test_denies_missing_requester if {
	d := data_release.decision with input as object.remove(base, ["requested_by"])
	not d.allow
	d.reasons == ["required field requested_by is missing"]
}

test_denies_non_object_input if {
	d := data_release.decision with input as 42
	not d.allow
	d.reasons == ["input must be an object, got 42"]
}
