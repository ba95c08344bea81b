# METADATA
# title: Tests of the approval gate
package factory.approval_test

import rego.v1

import data.factory.approval

base := {
	"user": {"id": "origin_officer", "site": "origin", "roles": ["compliance_officer"]},
	"gate": {"name": "stage_2_data_release", "owner_site": "origin", "required_role": "compliance_officer"},
	"requested_by": "origin_engineer",
}

with_user(fields) := object.union(base, {"user": fields})

has_reason(d, fragment) if {
	some r in d.reasons
	contains(r, fragment)
}

test_allows_officer_of_owner_site if {
	approval.decision == {"allow": true, "reasons": []} with input as base
}

test_allows_unknown_requester_as_null if {
	approval.decision.allow with input as object.union(base, {"requested_by": null})
}

test_allows_export_officer_for_export_gate if {
	approval.decision.allow with input as {
		"user": {"id": "supplier_export_officer", "site": "supplier", "roles": ["export_control_officer"]},
		"gate": {"name": "stage_5_export", "owner_site": "supplier", "required_role": "export_control_officer"},
		"requested_by": "supplier_engineer",
	}
}

test_denies_self_approval if {
	d := approval.decision with input as object.union(base, {"requested_by": "origin_officer"})
	not d.allow
	d.reasons == ["user origin_officer requested stage_2_data_release and may not answer their own request"]
}

test_denies_officer_of_wrong_site if {
	d := approval.decision with input as with_user({"id": "destination_officer", "site": "destination"})
	not d.allow
	d.reasons == ["user destination_officer belongs to destination; gate stage_2_data_release is answered at origin"]
}

test_denies_user_without_required_role if {
	d := approval.decision with input as with_user({"id": "origin_engineer", "roles": ["engineer"]})
	not d.allow
	has_reason(d, "user origin_engineer does not hold the role compliance_officer that gate stage_2_data_release requires")
}

test_denies_gate_requiring_non_officer_role if {
	d := approval.decision with input as object.union(
		with_user({"id": "origin_platform", "roles": ["engineer"]}),
		{"gate": {"required_role": "engineer"}},
	)
	not d.allow
	d.reasons == ["engineer is not an approving role at origin (policy data officers.site_roles); gate stage_2_data_release is misconfigured"]
}

test_denies_export_role_at_site_without_it if {
	d := approval.decision with input as object.union(
		with_user({"roles": ["export_control_officer"]}),
		{"gate": {"required_role": "export_control_officer"}},
	)
	not d.allow
	has_reason(d, "export_control_officer is not an approving role at origin")
}

test_denies_missing_requested_by if {
	d := approval.decision with input as object.remove(base, ["requested_by"])
	not d.allow
	d.reasons == ["required field requested_by is missing (null is allowed)"]
}

test_denies_malformed_requested_by if {
	d := approval.decision with input as object.union(base, {"requested_by": ["origin_engineer"]})
	not d.allow
	d.reasons == ["field requested_by must be a string or null, got [\"origin_engineer\"]"]
}

test_denies_missing_gate if {
	d := approval.decision with input as object.remove(base, ["gate"])
	not d.allow
	has_reason(d, "required field gate.name is missing")
	has_reason(d, "required field gate.owner_site is missing")
	has_reason(d, "required field gate.required_role is missing")
}

test_denies_malformed_roles if {
	d := approval.decision with input as with_user({"roles": "compliance_officer"})
	not d.allow
	d.reasons == ["field user.roles must be an array, got \"compliance_officer\""]
}

test_denies_non_object_input if {
	d := approval.decision with input as null
	not d.allow
	d.reasons == ["input must be an object, got null"]
}
