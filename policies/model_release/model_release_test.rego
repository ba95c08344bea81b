# METADATA
# title: Tests of the model release gate
package factory.model_release_test

import rego.v1

import data.factory.model_release

supplier_train := {
	"dataset_id": "supplier/train@1", "owner": "supplier", "local_only": false,
	"export_authorized": true, "releasable_to": ["origin", "destination"],
}

origin_subset := {
	"dataset_id": "origin/export_authorized@1", "owner": "origin", "local_only": false,
	"export_authorized": true, "releasable_to": ["supplier", "destination"],
}

origin_shared := {
	"dataset_id": "origin/shared@1", "owner": "origin", "local_only": false,
	"export_authorized": false, "releasable_to": ["supplier"],
}

origin_private := {
	"dataset_id": "origin/private@1", "owner": "origin", "local_only": true,
	"export_authorized": false, "releasable_to": [],
}

origin_officer := {"user": "origin_officer", "site": "origin", "roles": ["compliance_officer"], "decision": "approve"}

export_officer := {
	"user": "supplier_export_officer", "site": "supplier",
	"roles": ["export_control_officer"], "decision": "approve",
}

export_digest := "sha256:3333333333333333333333333333333333333333333333333333333333333333"

export := {
	"model": {
		"id": "digits-cnn-export/3",
		"site": "supplier",
		"metrics": {"supplier_test": 0.93, "loss": 0.2},
		"watermark": {"verified": true},
		"signature": {"verified": true},
		"robustness": {"evaluated": true, "accuracy": {"fgsm@0.05": 0.84, "pgd@0.05": 0.82}},
		"lineage": [supplier_train, origin_subset],
		"digest": export_digest,
		"membership_audits": [{
			"owner": "origin", "model_digest": export_digest, "attack": "loss-threshold",
			"auc": 0.6, "tpr_at_1pct_fpr": 0.05, "advantage": 0.2,
		}],
	},
	"recipient": "destination",
	"purpose": "export",
	"requested_by": "supplier_engineer",
	"approvals": [origin_officer, export_officer],
}

collaboration := {
	"model": {
		"id": "digits-cnn/3",
		"site": "supplier",
		"metrics": {"supplier_test": 0.9},
		"watermark": {"verified": false},
		"signature": {"verified": false},
		"lineage": [supplier_train, origin_shared],
	},
	"recipient": "origin",
	"purpose": "collaboration",
	"requested_by": "supplier_platform",
	"approvals": [],
}

with_model(doc, fields) := object.union(doc, {"model": fields})

# replaces a field of the model (object.union would merge into it)
replace_model(doc, key, value) := object.union(
	object.remove(doc, ["model"]),
	{"model": object.union(object.remove(doc.model, [key]), {key: value})},
)

with_lineage(doc, lineage) := object.union(doc, {"model": {"lineage": lineage}})

with_approvals(list) := object.union(export, {"approvals": list})

has_reason(d, fragment) if {
	some r in d.reasons
	contains(r, fragment)
}

denied_for(doc, fragment) if {
	d := model_release.decision with input as doc
	not d.allow
	has_reason(d, fragment)
}

# --- collaboration releases

test_allows_collaboration_release_to_origin if {
	model_release.decision == {"allow": true, "reasons": []} with input as collaboration
}

test_allows_collaboration_release_back_to_data_owner if {
	# the recipient owns a source that is not releasable to others
	model_release.decision.allow with input as object.union(
		with_lineage(collaboration, [supplier_train, object.union(origin_shared, {"releasable_to": []})]),
		{"recipient": "origin"},
	)
}

test_denies_collaboration_with_local_only_source if {
	denied_for(
		with_lineage(collaboration, [supplier_train, origin_private]),
		"model digits-cnn/3 was trained on local-only dataset origin/private@1 of origin and may not leave supplier",
	)
}

test_denies_collaboration_source_not_releasable if {
	denied_for(object.union(collaboration, {"recipient": "destination"}), "lineage source origin/shared@1 of origin is not releasable to destination")
}

test_denies_collaboration_with_rejection if {
	denied_for(
		object.union(collaboration, {"approvals": [object.union(origin_officer, {"decision": "reject"})]}),
		"origin_officer (origin) rejected the request",
	)
}

test_denies_release_to_own_site if {
	denied_for(object.union(collaboration, {"recipient": "supplier"}), "recipient supplier is the site that trained model digits-cnn/3")
}

test_denies_empty_lineage if {
	denied_for(with_lineage(collaboration, []), "model digits-cnn/3 has an empty lineage")
}

# --- review by a data owner (before an export is decided)

review := object.union(export, {"recipient": "origin", "purpose": "review", "approvals": []})

test_allows_review_by_a_data_owner_in_the_lineage if {
	model_release.decision == {"allow": true, "reasons": []} with input as review
}

test_denies_review_by_a_site_owning_no_source if {
	denied_for(
		with_lineage(review, [supplier_train, object.union(origin_subset, {"owner": "destination"})]),
		"origin owns no source in the lineage of model digits-cnn-export/3; only a data owner of a model may review it",
	)
}

test_denies_review_of_model_with_local_only_source if {
	denied_for(
		with_lineage(review, [supplier_train, origin_subset, origin_private]),
		"model digits-cnn-export/3 was trained on local-only dataset origin/private@1 of origin and may not leave supplier",
	)
}

test_denies_review_of_unsigned_model if {
	denied_for(with_model(review, {"signature": {"verified": false}}), "the signature of model digits-cnn-export/3 is not verified (required for review)")
}

test_denies_review_with_rejection if {
	denied_for(object.union(review, {"approvals": [object.union(origin_officer, {"decision": "reject"})]}), "origin_officer (origin) rejected the request")
}

# --- exports

test_allows_export_to_destination if {
	model_release.decision == {"allow": true, "reasons": []} with input as export
}

test_allows_export_of_supplier_only_lineage_with_both_supplier_officers if {
	model_release.decision.allow with input as object.union(with_lineage(export, [supplier_train]), {"approvals": [
		export_officer,
		{"user": "supplier_officer", "site": "supplier", "roles": ["compliance_officer"], "decision": "approve"},
	]})
}

test_denies_export_of_supplier_only_lineage_without_supplier_officer if {
	denied_for(with_lineage(export, [supplier_train]), "no approval by a compliance_officer of supplier (data owner in the lineage)")
}

test_denies_local_only_source_in_export_lineage if {
	denied_for(with_lineage(export, [supplier_train, origin_subset, origin_private]), "local-only dataset origin/private@1")
}

test_denies_source_not_export_authorized if {
	denied_for(
		with_lineage(export, [supplier_train, object.union(origin_shared, {"releasable_to": ["supplier", "destination"]})]),
		"lineage source origin/shared@1 of origin is not export-authorized",
	)
}

test_denies_source_not_releasable_to_recipient if {
	denied_for(
		with_lineage(export, [supplier_train, object.union(origin_subset, {"releasable_to": ["supplier"]})]),
		"lineage source origin/export_authorized@1 of origin is not releasable to destination",
	)
}

test_denies_metric_below_threshold if {
	denied_for(
		with_model(export, {"metrics": {"supplier_test": 0.71}}),
		"metric supplier_test of model digits-cnn-export/3 is 0.71, below the export threshold 0.9",
	)
}

test_allows_metric_at_threshold if {
	model_release.decision.allow with input as with_model(export, {"metrics": {"supplier_test": 0.9}})
}

test_denies_missing_metric if {
	denied_for(replace_model(export, "metrics", {"loss": 0.1}), "metric supplier_test of model digits-cnn-export/3 is missing")
}

test_denies_metric_given_as_string if {
	denied_for(with_model(export, {"metrics": {"supplier_test": "0.99"}}), "metric supplier_test of model digits-cnn-export/3 is missing")
}

test_threshold_comes_from_policy_data if {
	denied_for(export, "below the export threshold 0.95") with data.factory.release_thresholds.export as {"supplier_test": 0.95}
}

# Until models are watermarked the shipped data does not require it; the rule is exercised both ways.
test_denies_unverified_watermark if {
	denied_for(with_model(export, {"watermark": {"verified": false}}), "the watermark of model digits-cnn-export/3 is not verified (required for export)")
		with data.factory.release_verification.export.watermark as true
}

test_allows_unverified_watermark_when_policy_data_does_not_require_it if {
	model_release.decision.allow with input as with_model(export, {"watermark": {"verified": false}})
		with data.factory.release_verification.export.watermark as false
}

test_denies_unverified_signature if {
	denied_for(with_model(export, {"signature": {"verified": false}}), "the signature of model digits-cnn-export/3 is not verified (required for export)")
}

test_denies_recipient_without_licence if {
	d := model_release.decision with input as object.union(export, {"recipient": "origin"})
	not d.allow
	has_reason(d, "origin holds no export licence")
}

test_denies_recipient_with_an_empty_licence_list if {
	denied_for(export, "destination holds no export licence") with data.factory.export_licences as {"destination": []}
}

test_denies_purpose_without_thresholds_in_policy_data if {
	denied_for(export, "policy data release_thresholds has no entry for purpose export")
		with data.factory.release_thresholds as {"collaboration": {}}
}

test_denies_purpose_without_verification_requirements_in_policy_data if {
	denied_for(export, "policy data release_verification has no entry for purpose export")
		with data.factory.release_verification as {"collaboration": {"watermark": false, "signature": false}}
}

test_denies_expired_licence if {
	denied_for(export, "export licence EL-1 of destination expired on 2020-01-31") with data.factory.export_licences as {"destination": [{
		"id": "EL-1", "purposes": ["export"], "end_uses": ["evaluation"], "expires": "2020-01-31",
	}]}
}

test_allows_with_one_valid_licence_among_expired_ones if {
	model_release.decision.allow with input as export with data.factory.export_licences as {"destination": [
		{"id": "EL-1", "purposes": ["export"], "end_uses": [], "expires": "2020-01-31"},
		{"id": "EL-2", "purposes": ["export"], "end_uses": [], "expires": "2999-12-31"},
	]}
}

test_denies_licence_not_covering_purpose if {
	denied_for(export, "export licence EL-3 of destination does not cover purpose \"export\"") with data.factory.export_licences as {"destination": [{
		"id": "EL-3", "purposes": ["evaluation"], "end_uses": [], "expires": "2999-12-31",
	}]}
}

test_allows_end_use_covered_by_licence if {
	model_release.decision.allow with input as object.union(export, {"end_use": "border_surveillance"})
}

test_denies_end_use_not_covered_by_licence if {
	denied_for(object.union(export, {"end_use": "targeting"}), "export licence EL-2026-0042 of destination does not cover end use targeting")
}

test_denies_export_without_origin_officer if {
	denied_for(with_approvals([export_officer]), "no approval by a compliance_officer of origin (data owner in the lineage) other than the requester supplier_engineer")
}

test_denies_export_without_export_officer if {
	denied_for(with_approvals([origin_officer]), "no approval by an export_control_officer of supplier other than the requester supplier_engineer")
}

test_denies_export_approved_by_officer_of_wrong_site if {
	denied_for(
		with_approvals([export_officer, object.union(origin_officer, {"user": "destination_officer", "site": "destination"})]),
		"no approval by a compliance_officer of origin",
	)
}

test_denies_self_approval_by_requester if {
	d := model_release.decision with input as object.union(export, {"requested_by": "supplier_export_officer"})
	not d.allow
	has_reason(d, "supplier_export_officer approved their own request")
	has_reason(d, "no approval by an export_control_officer of supplier")
}

test_denies_rejection_among_export_approvals if {
	d := model_release.decision with input as with_approvals([
		origin_officer, export_officer,
		{"user": "supplier_officer", "site": "supplier", "roles": ["compliance_officer"], "decision": "reject"},
	])
	not d.allow
	d.reasons == ["supplier_officer (supplier) rejected the request"]
}

test_denies_same_user_for_both_approvals if {
	# one account claiming both roles cannot be the two approvers
	both := {"user": "x", "site": "supplier", "roles": ["compliance_officer", "export_control_officer"], "decision": "approve"}
	denied_for(
		object.union(with_lineage(export, [supplier_train]), {"approvals": [both]}),
		"the export approval and the approval for supplier data come from the same user",
	)
}

test_export_needs_officer_of_every_foreign_owner if {
	destination_subset := object.union(origin_subset, {"dataset_id": "destination/contribution@1", "owner": "destination"})
	doc := object.union(with_lineage(export, [supplier_train, origin_subset, destination_subset]), {"recipient": "destination"})
	denied_for(doc, "no approval by a compliance_officer of destination")
}

# --- malformed input

test_denies_unknown_purpose if {
	d := model_release.decision with input as object.union(export, {"purpose": "research"})
	not d.allow
	d.reasons == ["field purpose must be \"collaboration\", \"export\" or \"review\", got \"research\""]
}

test_denies_missing_watermark if {
	d := model_release.decision with input as replace_model(export, "watermark", {})
	not d.allow
	d.reasons == ["required field model.watermark.verified is missing"]
}

test_denies_malformed_lineage_entry if {
	d := model_release.decision with input as with_lineage(export, [supplier_train, {"dataset_id": "x", "owner": "origin"}, 7])
	not d.allow
	has_reason(d, "required field model.lineage[1].local_only is missing")
	has_reason(d, "required field model.lineage[1].releasable_to is missing")
	has_reason(d, "model.lineage[2] must be an object, got 7")
}

test_denies_lineage_not_a_list if {
	denied_for(with_lineage(export, "supplier/train@1"), "field model.lineage must be an array, got \"supplier/train@1\"")
}

test_denies_missing_model if {
	d := model_release.decision with input as object.remove(export, ["model"])
	not d.allow
	has_reason(d, "required field model.id is missing")
	has_reason(d, "required field model.lineage is missing")
}

test_denies_malformed_approvals if {
	denied_for(object.union(export, {"approvals": {"user": "x"}}), "field approvals must be an array")
}

test_denies_non_object_input if {
	d := model_release.decision with input as "release it"
	not d.allow
	d.reasons == ["input must be an object, got \"release it\""]
}

# --- capability restrictions of an export variant (checked against the licence's required_restrictions)

restricting_licence := {"destination": [{
	"id": "EL-R", "purposes": ["export"], "end_uses": ["evaluation"], "expires": "2999-12-31",
	"required_restrictions": {"abstain_classes": [3, 7], "max_confidence": 0.9},
}]}

restricted := replace_model(export, "restrictions", {"abstain_classes": [1, 3, 7], "max_confidence": 0.8})

test_allows_restricted_model_meeting_the_licence if {
	model_release.decision == {"allow": true, "reasons": []} with input as restricted
		with data.factory.export_licences as restricting_licence
}

test_allows_unrestricted_model_under_a_licence_requiring_nothing if {
	model_release.decision == {"allow": true, "reasons": []} with input as export
	model_release.decision.allow with input as replace_model(export, "restrictions", {})
}

test_denies_unrestricted_model_under_a_licence_requiring_restrictions if {
	d := model_release.decision with input as export with data.factory.export_licences as restricting_licence
	not d.allow
	d.reasons == [
		"export licence EL-R of destination requires confidence capped at 0.9; model digits-cnn-export/3 returns up to 1",
		"export licence EL-R of destination requires the model to abstain on class 3; model digits-cnn-export/3 does not",
		"export licence EL-R of destination requires the model to abstain on class 7; model digits-cnn-export/3 does not",
	]
}

test_denies_model_abstaining_on_too_few_classes if {
	d := model_release.decision with input as replace_model(export, "restrictions", {"abstain_classes": [3], "max_confidence": 0.9})
		with data.factory.export_licences as restricting_licence
	not d.allow
	d.reasons == ["export licence EL-R of destination requires the model to abstain on class 7; model digits-cnn-export/3 does not"]
}

test_denies_confidence_cap_above_the_licence if {
	d := model_release.decision with input as replace_model(export, "restrictions", {"abstain_classes": [3, 7], "max_confidence": 0.95})
		with data.factory.export_licences as restricting_licence
	not d.allow
	d.reasons == ["export licence EL-R of destination requires confidence capped at 0.9; model digits-cnn-export/3 returns up to 0.95"]
}

test_allows_when_another_licence_requires_no_restriction if {
	model_release.decision.allow with input as export with data.factory.export_licences as {"destination": [
		restricting_licence.destination[0],
		{"id": "EL-2", "purposes": ["export"], "end_uses": [], "expires": "2999-12-31"},
	]}
}

test_restrictions_are_not_required_of_collaboration_or_review if {
	model_release.decision.allow with input as collaboration with data.factory.export_licences as restricting_licence
	model_release.decision.allow with input as review with data.factory.export_licences as restricting_licence
}

test_denies_malformed_restrictions if {
	d := model_release.decision with input as replace_model(export, "restrictions", {
		"abstain_classes": [3, -1, 1.5, "7"], "max_confidence": 0, "hide": true,
	})
	not d.allow
	has_reason(d, "model.restrictions.abstain_classes must be a list of class indices")
	has_reason(d, "model.restrictions.max_confidence must be a number in (0, 1], got 0")
	has_reason(d, "model.restrictions has unknown key hide (known: abstain_classes, max_confidence)")
	denied_for(replace_model(export, "restrictions", [3, 7]), "field model.restrictions must be an object, got [3, 7]")
	denied_for(replace_model(export, "restrictions", {"max_confidence": 1.5}), "max_confidence must be a number in (0, 1], got 1.5")
}
