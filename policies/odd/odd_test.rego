package factory.odd_test

import data.factory.odd
import rego.v1

odd_sites := {"origin": {
	"approved_sensors": ["ORG-SN-0001", "ORG-SN-0002"],
	"envelope": {"sample_mean": {"min": 0.1, "max": 0.6}, "sample_std": {"min": 0.1, "max": 0.45}},
	"latency_budget_ms": 50,
	"geofence": [{"name": "area", "lat_min": 49.0, "lat_max": 52.5, "lon_min": 2.5, "lon_max": 6.5}],
	"flag_only": ["latency"],
}}

request := {
	"site": "origin",
	"model": {"name": "digits-cnn-origin", "version": "3", "stage": "M4"},
	"context": {"sensor_id": "ORG-SN-0001", "location": {"lat": 50.8, "lon": 4.3}},
	"stats": {"batch_size": 2, "sample_mean": {"min": 0.2, "max": 0.3}, "sample_std": {"min": 0.2, "max": 0.25}},
	"latency_ms": 1.5,
}

decide(req) := d if {
	d := odd.decision with input as req with data.factory.odd_sites as odd_sites
}

test_in_domain_request_is_allowed if {
	d := decide(request)
	d.allow
	d.reasons == []
	d.mode == "normal"
}

test_location_is_optional if {
	d := decide(json.remove(request, ["context/location"]))
	d.allow
}

test_unapproved_sensor_withholds if {
	d := decide(object.union(request, {"context": {"sensor_id": "DST-SN-0001"}}))
	not d.allow
	d.mode == "withhold"
	d.reasons == ["sensor DST-SN-0001 is not in the approved sensor list of origin"]
}

test_missing_sensor_withholds if {
	d := decide(json.remove(request, ["context/sensor_id"]))
	not d.allow
	d.mode == "withhold"
	some r in d.reasons
	contains(r, "sensor_id is missing")
}

test_mean_above_envelope_withholds if {
	d := decide(object.union(request, {"stats": {"sample_mean": {"max": 0.93}}}))
	not d.allow
	d.mode == "withhold"
	d.reasons == ["input sample_mean 0.93 is above the envelope maximum 0.6"]
}

test_std_below_envelope_withholds if {
	d := decide(object.union(request, {"stats": {"sample_std": {"min": 0.04}}}))
	not d.allow
	d.reasons == ["input sample_std 0.04 is below the envelope minimum 0.1"]
}

test_missing_stats_fail_closed if {
	d := decide(json.remove(request, ["stats"]))
	not d.allow
	count(d.reasons) == 2
}

test_latency_over_budget_only_flags if {
	d := decide(object.union(request, {"latency_ms": 75}))
	not d.allow
	d.mode == "flag"
	d.reasons == ["inference took 75 ms, over the latency budget of 50 ms"]
}

test_request_budget_tightens_site_budget if {
	req := object.union(request, {"context": {"latency_budget_ms": 1}})
	d := decide(req)
	not d.allow
	d.reasons == ["inference took 1.5 ms, over the latency budget of 1 ms"]
}

test_request_cannot_loosen_site_budget if {
	req := object.union(request, {"context": {"latency_budget_ms": 500}, "latency_ms": 60})
	not decide(req).allow
}

test_latency_and_sensor_breach_withholds if {
	req := object.union(request, {"context": {"sensor_id": "X"}, "latency_ms": 75})
	d := decide(req)
	d.mode == "withhold"
	count(d.reasons) == 2
}

test_outside_geofence_withholds if {
	d := decide(object.union(request, {"context": {"location": {"lat": 59.3, "lon": 18.0}}}))
	not d.allow
	d.mode == "withhold"
	d.reasons == ["location (59.3, 18) is outside the geofence of origin"]
}

test_malformed_location_withholds if {
	d := decide(object.union(request, {"context": {"location": "Brussels"}}))
	not d.allow
	d.reasons == ["context.location must be {\"lat\": number, \"lon\": number}"]
}

test_site_without_odd_is_denied if {
	d := decide(object.union(request, {"site": "supplier"}))
	not d.allow
	d.mode == "withhold"
	"no ODD is declared for site supplier" in d.reasons
}

test_empty_input_is_denied if {
	d := decide({})
	not d.allow
	d.mode == "withhold"
	count(d.reasons) > 0
}

test_shipped_data_declares_both_running_sites if {
	data.factory.odd_sites.origin.latency_budget_ms > 0
	data.factory.odd_sites.destination.latency_budget_ms > 0
}
