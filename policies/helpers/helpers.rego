# METADATA
# title: Shared helpers of the factory gates
# description: |
#   Field checks that turn a missing or malformed input field into a readable reason,
#   the classification order, approval matching and licence dates. Every gate uses it.
#   Policy data is policies/factory/data.json, at data.factory (the path of its folder,
#   as `opa run --server policies/` loads it).
#
#   Each gate decides from its `deny` set alone: allowed when no `deny` rule holds, the
#   reasons of a denial are the `deny` messages.
package factory.helpers

import rego.v1

# METADATA
# description: Classification and clearance levels, public < restricted < confidential < secret.
levels := data.factory.classification_levels

# METADATA
# description: Today's date (UTC) as YYYY-MM-DD, compared with licence expiry dates.
today := sprintf("%04d-%02d-%02d", time.date(time.now_ns()))

# METADATA
# description: |
#   Reasons for the fields of obj that fail their spec, obj named label in the reasons
#   ("input" for the whole input). specs is a list of [path, kind] pairs, path an array
#   of keys, kind one of the kinds of `kind_ok`.
entry_reasons(obj, specs, label) := {sprintf("%s must be an object, got %s", [label, shown(obj)])} if {
	not is_object(obj)
} else := field_reasons(obj, specs, prefix(label))

# METADATA
# description: Reasons for the fields of an object obj; pre is put before each field name.
field_reasons(obj, specs, pre) := {msg |
	some spec in specs
	msg := field_reason(obj, spec[0], spec[1], pre)
}

prefix("input") := ""

prefix(label) := concat("", [label, "."]) if label != "input"

# METADATA
# description: One field's reason, undefined when the field is well formed.
field_reason(obj, path, kind, pre) := sprintf("required field %s%s is missing", [pre, concat(".", path)]) if {
	kind != "string_or_null"
	object.get(obj, path, null) == null
} else := sprintf("required field %s%s is missing (null is allowed)", [pre, concat(".", path)]) if {
	kind == "string_or_null"
	object.get(obj, path, 0) == 0
} else := sprintf("field %s%s must be %s, got %s", [
	pre, concat(".", path), kind_labels[kind],
	shown(object.get(obj, path, null)),
]) if {
	not kind_ok(object.get(obj, path, null), kind)
}

# METADATA
# description: Reasons for the malformed entries of a list field (each entry checked against specs).
list_reasons(list, specs, name) := {msg |
	some i, entry in list
	some msg in entry_reasons(entry, specs, sprintf("%s[%d]", [name, i]))
}

# METADATA
# description: Words for each kind, used in reasons.
kind_labels := {
	"string": "a non-empty string",
	"string_or_null": "a string or null",
	"boolean": "true or false",
	"object": "an object",
	"array": "an array",
	"strings": "an array of strings",
	"level": "one of public, restricted, confidential, secret",
	"decision": "\"approve\" or \"reject\"",
	"purpose": "\"collaboration\", \"export\" or \"review\"",
}

# METADATA
# description: A value as it appears in a reason (its JSON, or its type when long).
shown(v) := json.marshal(v) if {
	count(json.marshal(v)) <= 40
} else := type_name(v)

# METADATA
# description: Whether v is well formed for kind.
kind_ok(v, "string") if {
	is_string(v)
	v != ""
}

kind_ok(v, "string_or_null") if is_string(v)

kind_ok(v, "string_or_null") if is_null(v)

kind_ok(v, "boolean") if is_boolean(v)

kind_ok(v, "object") if is_object(v)

kind_ok(v, "array") if is_array(v)

kind_ok(v, "strings") if {
	is_array(v)
	every x in v {
		is_string(x)
	}
}

kind_ok(v, "level") if is_number(levels[v])

kind_ok(v, "decision") if v in {"approve", "reject"}

kind_ok(v, "purpose") if v in {"collaboration", "export", "review"}

# METADATA
# description: The fields every approval carries.
approval_fields := [
	[["user"], "string"],
	[["site"], "string"],
	[["roles"], "array"],
	[["decision"], "decision"],
]

# METADATA
# description: Reasons for malformed approvals (the input field is named "approvals").
approval_reasons(approvals) := {"required field approvals is missing"} if {
	is_null(approvals)
} else := {sprintf("field approvals must be an array, got %s", [shown(approvals)])} if {
	not is_array(approvals)
} else := list_reasons(approvals, approval_fields, "approvals")

# METADATA
# description: Whether approval a approves and comes from a holder of role at site other than the requester.
approved_by(a, site, role, requester) if {
	a.decision == "approve"
	a.site == site
	role in a.roles
	a.user != requester
}

# METADATA
# description: One reason per rejection among the approvals.
rejection_reasons(approvals) := {sprintf("%s (%s) rejected the request", [a.user, a.site]) |
	is_array(approvals)
	some a in approvals
	a.decision == "reject"
}

# METADATA
# description: A reason when the requester approved their own request.
self_approval_reasons(approvals, requester) := {sprintf(
	"%s approved their own request; the requester may not approve it",
	[requester],
) |
	is_array(approvals)
	some a in approvals
	a.decision == "approve"
	a.user == requester
}

# METADATA
# description: Whether a classification level is at most another (both known levels).
at_most(level, ceiling) if levels[level] <= levels[ceiling]
