# METADATA
# title: Approval gate
# description: |
#   May this user answer this gate (approve or reject a request)?
#   Input: {user: {id, site, roles}, gate: {name, owner_site, required_role},
#   requested_by}. requested_by is required; it is null while the requester is not
#   known yet (when the approvers of a gate are listed before the request).
#   Allowed when the user belongs to the gate's owner site, holds the required role,
#   that role is an officer role of the site (data.data.officers.site_roles), and the
#   user is not the requester.
package factory.approval

import rego.v1

# METADATA
# description: |
#   The decision document of the gate. Its first body is every check on one path, so the
#   interpreter does little work when the user may answer; `deny` states the same
#   checks one by one with their reasons. Types are checked by comparisons across types,
#   cheaper in regorus than builtins such as is_string (see model_release): `"" <= x; x < []`
#   holds exactly for a string, `[] <= x; x < {}` for an array.
# entrypoint: true
decision := {"allow": true, "reasons": []} if {
	user := input.user
	gate := input.gate

	"" < user.id
	user.id < []
	"" <= user.site
	user.site < []
	[] <= user.roles
	user.roles < {}
	"" < gate.name
	gate.name < []
	"" <= gate.owner_site
	gate.owner_site < []
	"" <= gate.required_role
	gate.required_role < []
	type_name(object.get(input, "requested_by", 0)) in {"string", "null"}

	user.site == gate.owner_site
	gate.required_role in user.roles
	gate.required_role in data.data.officers.site_roles[gate.owner_site]
	user.id != input.requested_by
} else := {"allow": false, "reasons": reasons}

# METADATA
# description: Whether the request is allowed.
allow := decision.allow

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
	not gate.required_role in object.get(data.data.officers.site_roles, gate.owner_site, [])
	msg := sprintf("%s is not an approving role at %s (policy data officers.site_roles); gate %s is misconfigured", [
		gate.required_role, gate.owner_site, gate.name,
	])
}

deny contains msg if {
	well_formed
	user.id == input.requested_by
	msg := sprintf("user %s requested %s and may not answer their own request", [user.id, gate.name])
}

# METADATA
# description: The reasons of a denial, never empty.
reasons := sort(deny) if {
	count(deny) > 0
} else := ["denied by default: no rule allowed this request"]
