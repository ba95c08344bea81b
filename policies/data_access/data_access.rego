# METADATA
# title: Data access gate
# description: |
#   May this subject perform this action on this dataset for this purpose?
#   Input: {subject: {id, site, roles, clearance}, action, purpose,
#   resource: {id, owner, classification, releasable_to, purposes}}.
#   Allowed when the subject's clearance covers the classification, one of its roles
#   permits the action (data.data.role_actions), the purpose is one the dataset may
#   serve, and the subject's site owns the dataset or is one it is releasable to.
#   Deny by default; every denial names the field, dataset or subject.
package factory.data_access

import rego.v1

# METADATA
# description: The decision document of the gate.
# entrypoint: true
decision := {"allow": true, "reasons": []} if {
	allow
} else := {"allow": false, "reasons": reasons}

# METADATA
# description: |
#   Every check on one path, so the interpreter evaluates a single rule when the request
#   is allowed. `deny` states the same checks one by one with their reasons.
default allow := false

allow if {
	subject := input.subject
	resource := input.resource
	levels := data.data.classification_levels

	# well formed
	is_string(subject.id)
	subject.id != ""
	is_string(subject.site)
	is_array(subject.roles)
	every r in subject.roles {
		is_string(r)
	}
	is_string(input.action)
	is_string(input.purpose)
	is_string(resource.id)
	resource.id != ""
	is_string(resource.owner)
	resource.owner != ""
	is_array(resource.releasable_to)
	every s in resource.releasable_to {
		is_string(s)
	}
	is_array(resource.purposes)
	every p in resource.purposes {
		is_string(p)
	}

	# clearance covers the classification (both must be known levels)
	levels[resource.classification] <= levels[subject.clearance]

	# a role permits the action
	some role in subject.roles
	input.action in data.data.role_actions[role]

	# the dataset may serve the purpose
	input.purpose in resource.purposes

	# the subject's site owns the dataset or may receive it
	subject.site in array.concat(resource.releasable_to, [resource.owner])
}

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
	input.action in data.data.role_actions[role]
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

# METADATA
# description: The reasons of a denial, never empty.
reasons := sort(deny) if {
	count(deny) > 0
} else := ["denied by default: no rule allowed this request"]
