# METADATA
# title: Data release gate
# description: |
#   May this dataset leave its owner's site for the recipient?
#   Input: {dataset: {id, owner, classification, local_only,
#   sanitization: {passed, remaining_sensitive_columns}, validation: {success}},
#   recipient, requested_by, approvals: [{user, site, roles, decision}]}.
#   Allowed when sanitization passed with no sensitive column left, validation
#   succeeded, the dataset is not local-only, its classification is at most the
#   ceiling agreed for releases from the owner to the recipient
#   (data.factory.release_ceilings), the recipient is listed in dataset.releasable_to
#   when that optional field is given, and a compliance_officer of the owner site
#   other than the requester approved, with no rejection and no self-approval.
package factory.data_release

import rego.v1

# METADATA
# description: The decision document of the gate, decided by `deny` alone.
# entrypoint: true
decision := {"allow": allow, "reasons": sort(deny)}

# METADATA
# description: Allowed exactly when no `deny` rule holds.
default allow := false

allow if count(deny) == 0

fields := [
	[["dataset", "id"], "string"],
	[["dataset", "owner"], "string"],
	[["dataset", "classification"], "level"],
	[["dataset", "local_only"], "boolean"],
	[["dataset", "sanitization", "passed"], "boolean"],
	[["dataset", "sanitization", "remaining_sensitive_columns"], "strings"],
	[["dataset", "validation", "success"], "boolean"],
	[["recipient"], "string"],
	[["requested_by"], "string"],
]

field_problems := data.factory.helpers.entry_reasons(input, fields, "input") | approval_problems

approval_problems := data.factory.helpers.approval_reasons(object.get(input, "approvals", null)) if {
	is_object(input)
} else := set()

well_formed if count(field_problems) == 0

ds := input.dataset

# METADATA
# description: Why the release is denied; each reason names the field, dataset or user.
deny contains msg if {
	some msg in field_problems
}

deny contains msg if {
	well_formed
	ds.sanitization.passed == false
	msg := sprintf("dataset %s did not pass sanitization", [ds.id])
}

deny contains msg if {
	well_formed
	count(ds.sanitization.remaining_sensitive_columns) > 0
	msg := sprintf("dataset %s still holds sensitive columns: %s", [
		ds.id, concat(", ", ds.sanitization.remaining_sensitive_columns),
	])
}

deny contains msg if {
	well_formed
	ds.validation.success == false
	msg := sprintf("dataset %s did not pass validation", [ds.id])
}

deny contains msg if {
	well_formed
	ds.local_only == true
	msg := sprintf("dataset %s is local-only and may never leave %s", [ds.id, ds.owner])
}

deny contains msg if {
	well_formed
	input.recipient == ds.owner
	msg := sprintf("recipient %s owns dataset %s; a release must leave the owner's site", [input.recipient, ds.id])
}

deny contains msg if {
	well_formed
	input.recipient != ds.owner
	not data.factory.release_ceilings[ds.owner][input.recipient]
	msg := sprintf("no release of %s data to %s is agreed in policy data (release_ceilings)", [
		ds.owner, input.recipient,
	])
}

deny contains msg if {
	well_formed
	ceiling := data.factory.release_ceilings[ds.owner][input.recipient]
	not data.factory.helpers.at_most(ds.classification, ceiling)
	msg := sprintf("dataset %s is %s, above the %s ceiling for releases from %s to %s", [
		ds.id, ds.classification, ceiling, ds.owner, input.recipient,
	])
}

deny contains msg if {
	well_formed
	releasable_to := object.get(ds, "releasable_to", [input.recipient])
	not is_array(releasable_to)
	msg := sprintf("field dataset.releasable_to must be an array of sites, got %s", [data.factory.helpers.shown(releasable_to)])
}

deny contains msg if {
	well_formed
	is_array(ds.releasable_to)
	not input.recipient in ds.releasable_to
	msg := sprintf("dataset %s is not releasable to %s (releasable to: %s)", [
		ds.id, input.recipient, concat(", ", [sprintf("%v", [s]) | some s in ds.releasable_to]),
	])
}

deny contains msg if {
	well_formed
	role := data.factory.officers.data_owner_role
	not owner_officer_approved
	msg := sprintf("no approval by a %s of %s other than the requester %s", [role, ds.owner, input.requested_by])
}

owner_officer_approved if {
	well_formed
	some a in input.approvals
	data.factory.helpers.approved_by(a, ds.owner, data.factory.officers.data_owner_role, input.requested_by)
}

deny contains msg if {
	well_formed
	some msg in data.factory.helpers.rejection_reasons(input.approvals)
}

deny contains msg if {
	well_formed
	some msg in data.factory.helpers.self_approval_reasons(input.approvals, input.requested_by)
}
