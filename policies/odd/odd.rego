# METADATA
# title: Operational design domain (ODD) gate
# description: |
#   May the serving model answer this inference request normally? The request must come
#   from an approved sensor, its inputs must lie inside the declared statistical envelope,
#   inference must meet the latency budget, and a location, when given, must lie inside the
#   site's geofence. Input: {site, model, context: {sensor_id, location: {lat, lon},
#   latency_budget_ms}, stats: {batch_size, sample_mean: {min, max}, sample_std: {min, max}},
#   latency_ms}. The ODD of each site is policy data (data.factory.odd_sites). A breach answers
#   in safe mode: "flag" (prediction returned, flagged) when every breach is of a kind listed
#   in the site's flag_only, otherwise "withhold" (no prediction). Deny by default.
# entrypoint: true
package factory.odd

import rego.v1

# METADATA
# description: The decision document of the gate, decided by `breaches` alone.
decision := {"allow": allow, "reasons": sort(breach_reasons), "mode": mode}

# METADATA
# description: The declared ODD of the requesting site; undefined for a site without one.
odd := data.factory.odd_sites[input.site]

context := object.get(input, "context", {})

envelope_stats := ["sample_mean", "sample_std"]

default allow := false

# METADATA
# description: Allowed exactly when the request breaches nothing (a site without a declared ODD is a breach).
allow if count(breaches) == 0

# METADATA
# description: Breaches as [kind, reason] pairs; kinds are site, context, sensor, envelope, latency, geofence.
breaches contains ["site", msg] if {
	not odd
	msg := sprintf("no ODD is declared for site %v", [object.get(input, "site", null)])
}

breaches contains ["context", "context must be an object"] if not is_object(context)

breaches contains ["sensor", "context.sensor_id is missing: every request must name its sensor"] if {
	not is_string(context.sensor_id)
}

breaches contains ["sensor", msg] if {
	is_string(context.sensor_id)
	approved := odd.approved_sensors
	not context.sensor_id in approved
	msg := sprintf("sensor %s is not in the approved sensor list of %s", [context.sensor_id, input.site])
}

breaches contains ["envelope", msg] if {
	some stat in envelope_stats
	not stat_ok(input.stats[stat])
	msg := sprintf("input statistic %s is missing or malformed", [stat])
}

breaches contains ["envelope", msg] if {
	some stat in envelope_stats
	stat_ok(input.stats[stat])
	bounds := odd.envelope[stat]
	input.stats[stat].min < bounds.min
	msg := sprintf("input %s %v is below the envelope minimum %v", [stat, round3(input.stats[stat].min), bounds.min])
}

breaches contains ["envelope", msg] if {
	some stat in envelope_stats
	stat_ok(input.stats[stat])
	bounds := odd.envelope[stat]
	input.stats[stat].max > bounds.max
	msg := sprintf("input %s %v is above the envelope maximum %v", [stat, round3(input.stats[stat].max), bounds.max])
}

breaches contains ["latency", "latency_ms is missing or not a number"] if not is_number(input.latency_ms)

breaches contains ["latency", msg] if {
	is_number(input.latency_ms)
	input.latency_ms > latency_budget
	msg := sprintf("inference took %v ms, over the latency budget of %v ms", [round3(input.latency_ms), latency_budget])
}

breaches contains ["geofence", "context.location must be {\"lat\": number, \"lon\": number}"] if {
	location := context.location
	not location_ok(location)
}

breaches contains ["geofence", msg] if {
	location_ok(context.location)
	not inside_geofence(context.location)
	msg := sprintf("location (%v, %v) is outside the geofence of %v", [
		context.location.lat, context.location.lon, object.get(input, "site", null),
	])
}

# METADATA
# description: The site's budget, tightened by the request's own latency_budget_ms when it gives one.
latency_budget := min({odd.latency_budget_ms, context.latency_budget_ms}) if {
	is_number(context.latency_budget_ms)
} else := odd.latency_budget_ms

stat_ok(s) if {
	is_number(s.min)
	is_number(s.max)
}

location_ok(loc) if {
	is_number(loc.lat)
	is_number(loc.lon)
}

inside_geofence(loc) if {
	some area in odd.geofence
	area.lat_min <= loc.lat
	loc.lat <= area.lat_max
	area.lon_min <= loc.lon
	loc.lon <= area.lon_max
}

round3(x) := round(x * 1000) / 1000

breach_kinds := {kind | some [kind, _] in breaches}

breach_reasons := {msg | some [_, msg] in breaches}

# METADATA
# description: How the service answers, normal when allowed; flag only when every breach kind allows it.
mode := "normal" if {
	allow
} else := "flag" if {
	flag_only := odd.flag_only
	every kind in breach_kinds {
		kind in flag_only
	}
} else := "withhold"
