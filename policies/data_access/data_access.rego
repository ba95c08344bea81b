# METADATA
# title: Data access gate
# description: |
#   May this subject perform this action on this dataset for this purpose?
#   Input: {subject: {id, site, roles, clearance}, action, purpose,
#   resource: {id, owner, classification, releasable_to, purposes}}.
#   Allowed when the subject's clearance covers the classification, one of its roles
#   permits the action (data.factory.role_actions), the purpose is one the dataset may
#   serve, and the subject's site owns the dataset or is one it is releasable to.
#   Deny by default; every denial names the field, dataset or subject.
package factory.data_access

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
	[["subject", "id"], "string"],
	[["subject", "site"], "string"],
	[["subject", "roles"], "strings"],
	[["subject", "clearance"], "level"],
	[["action"], "string"],
	[["purpose"], "string"],
	[["resource", "id"], "string"],
	[["resource", "owner"], "string"],
	[["resource", "classification"], "level"],
	[["resource", "releasable_to"], "strings"],
	[["resource", "purposes"], "strings"],
]

field_problems := data.factory.helpers.entry_reasons(input, fields, "input")

well_formed if count(field_problems) == 0

# METADATA
# description: Why the request is denied; each reason names the field, dataset or subject.
deny contains msg if {
	some msg in field_problems
}

deny contains msg if {
	well_formed
	not data.factory.helpers.at_most(input.resource.classification, input.subject.clearance)
	msg := sprintf("subject %s has clearance %s, below the classification %s of dataset %s", [
		input.subject.id, input.subject.clearance, input.resource.classification, input.resource.id,
	])
}

deny contains msg if {
	well_formed
	not role_permits
	msg := sprintf("no role of subject %s (%s) permits action \"%s\"", [
		input.subject.id, concat(", ", input.subject.roles), input.action,
	])
}

role_permits if {
	well_formed
	some role in input.subject.roles
	input.action in data.factory.role_actions[role]
}

deny contains msg if {
	well_formed
	not input.purpose in input.resource.purposes
	msg := sprintf("dataset %s may not be used for purpose \"%s\" (allowed: %s)", [
		input.resource.id, input.purpose, concat(", ", input.resource.purposes),
	])
}

deny contains msg if {
	well_formed
	input.subject.site != input.resource.owner
	not input.subject.site in input.resource.releasable_to
	msg := sprintf("dataset %s of %s is not releasable to site %s of subject %s", [
		input.resource.id, input.resource.owner, input.subject.site, input.subject.id,
	])
}
