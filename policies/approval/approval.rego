# METADATA
# title: Approval gate
# description: |
#   May this user answer this gate (approve or reject a request)?
#   Input: {user: {id, site, roles}, gate: {name, owner_site, required_role},
#   requested_by}. requested_by is required; it is null while the requester is not
#   known yet (when the approvers of a gate are listed before the request).
#   Allowed when the user belongs to the gate's owner site, holds the required role,
#   that role is an officer role of the site (data.factory.officers.site_roles), and the
#   user is not the requester.
package factory.approval

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
	[["user", "id"], "string"],
	[["user", "site"], "string"],
	[["user", "roles"], "array"],
	[["gate", "name"], "string"],
	[["gate", "owner_site"], "string"],
	[["gate", "required_role"], "string"],
	[["requested_by"], "string_or_null"],
]

field_problems := data.factory.helpers.entry_reasons(input, fields, "input")

well_formed if count(field_problems) == 0

user := input.user

gate := input.gate

# METADATA
# description: Why the user may not answer; each reason names the user and the gate.
deny contains msg if {
	some msg in field_problems
}

deny contains msg if {
	well_formed
	user.site != gate.owner_site
	msg := sprintf("user %s belongs to %s; gate %s is answered at %s", [user.id, user.site, gate.name, gate.owner_site])
}

deny contains msg if {
	well_formed
	not gate.required_role in user.roles
	msg := sprintf("user %s does not hold the role %s that gate %s requires", [user.id, gate.required_role, gate.name])
}

deny contains msg if {
	well_formed
	not gate.required_role in object.get(data.factory.officers.site_roles, gate.owner_site, [])
	msg := sprintf("%s is not an approving role at %s (policy data officers.site_roles); gate %s is misconfigured", [
		gate.required_role, gate.owner_site, gate.name,
	])
}

deny contains msg if {
	well_formed
	user.id == input.requested_by
	msg := sprintf("user %s requested %s and may not answer their own request", [user.id, gate.name])
}
