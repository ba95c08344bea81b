# METADATA
# title: Tests of the shared helpers
package factory.helpers_test

import rego.v1

import data.factory.helpers

test_kind_ok_string if {
	data.factory.helpers.kind_ok("x", "string")
	not data.factory.helpers.kind_ok("", "string")
	not data.factory.helpers.kind_ok(1, "string")
}

test_kind_ok_boolean_object_array if {
	data.factory.helpers.kind_ok(false, "boolean")
	not data.factory.helpers.kind_ok(0, "boolean")
	data.factory.helpers.kind_ok({}, "object")
	not data.factory.helpers.kind_ok([], "object")
	data.factory.helpers.kind_ok([], "array")
	not data.factory.helpers.kind_ok({}, "array")
}

test_kind_ok_strings if {
	data.factory.helpers.kind_ok(["a", "b"], "strings")
	not data.factory.helpers.kind_ok(["a", 1], "strings")
	not data.factory.helpers.kind_ok("a", "strings")
}

test_kind_ok_level if {
	data.factory.helpers.kind_ok("public", "level")
	data.factory.helpers.kind_ok("secret", "level")
	not data.factory.helpers.kind_ok("cosmic", "level")
}

test_kind_ok_string_or_null if {
	data.factory.helpers.kind_ok(null, "string_or_null")
	data.factory.helpers.kind_ok("x", "string_or_null")
	not data.factory.helpers.kind_ok(3, "string_or_null")
}

test_kind_ok_decision_and_purpose if {
	data.factory.helpers.kind_ok("reject", "decision")
	not data.factory.helpers.kind_ok("abstain", "decision")
	data.factory.helpers.kind_ok("export", "purpose")
	data.factory.helpers.kind_ok("review", "purpose")
	not data.factory.helpers.kind_ok("research", "purpose")
}

test_entry_reasons_name_nested_fields if {
	reasons := data.factory.helpers.entry_reasons({"a": {"b": 1}}, [[["a", "b"], "string"], [["a", "c"], "boolean"]], "input")
	reasons == {"field a.b must be a non-empty string, got 1", "required field a.c is missing"}
}

test_entry_reasons_of_non_object if {
	data.factory.helpers.entry_reasons([1], [[["a"], "string"]], "item") == {"item must be an object, got [1]"}
}

test_list_reasons_name_the_index if {
	data.factory.helpers.list_reasons([{"a": "x"}, {}], [[["a"], "string"]], "list") == {"required field list[1].a is missing"}
}

test_shown_abbreviates_long_values if {
	data.factory.helpers.shown("short") == "\"short\""
	data.factory.helpers.shown({"a": "a value that is much longer than forty characters"}) == "object"
}

test_at_most_orders_levels if {
	data.factory.helpers.at_most("public", "restricted")
	data.factory.helpers.at_most("confidential", "confidential")
	not data.factory.helpers.at_most("secret", "confidential")
	not data.factory.helpers.at_most("unknown", "secret")
}

test_approved_by_needs_site_role_and_not_requester if {
	a := {"user": "o", "site": "origin", "roles": ["compliance_officer"], "decision": "approve"}
	data.factory.helpers.approved_by(a, "origin", "compliance_officer", "someone")
	not data.factory.helpers.approved_by(a, "origin", "compliance_officer", "o")
	not data.factory.helpers.approved_by(a, "supplier", "compliance_officer", "someone")
	not data.factory.helpers.approved_by(object.union(a, {"decision": "reject"}), "origin", "compliance_officer", "someone")
}

test_today_is_a_date if {
	regex.match(`^[0-9]{4}-[0-9]{2}-[0-9]{2}$`, helpers.today)
}
