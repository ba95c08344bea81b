# METADATA
# title: Model release gate
# description: |
#   May this model leave the site that trained it for the recipient?
#   Input: {model: {id, site, metrics: {name: value}, watermark: {verified},
#   signature: {verified}, lineage: [{dataset_id, owner, local_only, export_authorized,
#   releasable_to}], restrictions (optional): {abstain_classes: [class index], max_confidence:
#   number in (0, 1]}}, recipient, purpose: "collaboration"|"export"|"review", requested_by,
#   approvals: [{user, site, roles, decision}], end_use (optional)}.
#
#   Every release: a non-empty lineage with no local-only source, every source owned by
#   the recipient or releasable to it, the requirements of the purpose met
#   (data.factory.release_thresholds per metric, data.factory.release_verification:
#   verified watermark and signature where required), no rejection and no self-approval among the approvals.
#   Collaboration releases need no officer approval here: the data owner's officer
#   approved the data release that brought the data to the sender.
#   Review (a model sent to a data owner so that its officer can evaluate it on the owner's
#   own test data before deciding on an export) goes only to a site that owns a source in
#   the model's lineage; it needs no approval (the review is what leads to one).
#   Export adds: every source export-authorized; a licence of the recipient that covers
#   the purpose (and the end use when given), whose required_restrictions the model's
#   capability restrictions meet (it abstains on every class the licence names, its confidence
#   cap is at most the licence's max_confidence) and has not expired
#   (data.factory.export_licences); approvals by distinct users, a compliance_officer of
#   every data owner in the lineage other than the sender (the sender's own when it is
#   the only owner) and an export_control_officer of the sender, none by the requester.
package factory.model_release

import rego.v1

# METADATA
# description: The decision document of the gate, decided by `deny` alone.
# entrypoint: true
decision := {"allow": allow, "reasons": sort(deny)}

# METADATA
# description: Allowed exactly when no `deny` rule holds.
default allow := false

allow if count(deny) == 0

# METADATA
# description: The [required, verified] pairs that meet a verification requirement (true = required).
verification_met := {[false, false], [false, true], [true, true]}

# METADATA
# description: Whether a requirement (true = required) is met by a verification result.
satisfied(required, verified) if [required, verified] in verification_met

# METADATA
# description: The data owners whose officers approve an export (the sender's own when it is the only owner).
approving_owners := owners if {
	well_formed
	owners := {s.owner | some s in input.model.lineage; s.owner != input.model.site}
	count(owners) > 0
} else := {input.model.site}

fields := [
	[["model", "id"], "string"],
	[["model", "site"], "string"],
	[["model", "metrics"], "object"],
	[["model", "watermark", "verified"], "boolean"],
	[["model", "signature", "verified"], "boolean"],
	[["model", "lineage"], "array"],
	[["recipient"], "string"],
	[["purpose"], "purpose"],
	[["requested_by"], "string"],
]

source_fields := [
	[["dataset_id"], "string"],
	[["owner"], "string"],
	[["local_only"], "boolean"],
	[["export_authorized"], "boolean"],
	[["releasable_to"], "array"],
]

field_problems := (data.factory.helpers.entry_reasons(input, fields, "input") | approval_problems) | source_problems

approval_problems := data.factory.helpers.approval_reasons(object.get(input, "approvals", null)) if {
	is_object(input)
} else := set()

source_problems := data.factory.helpers.list_reasons(input.model.lineage, source_fields, "model.lineage") if {
	is_array(input.model.lineage)
} else := set()

well_formed if count(field_problems) == 0

# METADATA
# description: The model's capability restrictions ({} when it has none or they are not an object).
granted := r if {
	r := input.model.restrictions
	is_object(r)
} else := {}

restriction_keys := {"abstain_classes", "max_confidence"}

# METADATA
# description: What is wrong with the form of model.restrictions.
restriction_problems contains msg if {
	r := input.model.restrictions
	not is_object(r)
	msg := sprintf("field model.restrictions must be an object, got %v", [r])
}

restriction_problems contains msg if {
	some key, _ in granted
	not key in restriction_keys
	msg := sprintf("model.restrictions has unknown key %v (known: abstain_classes, max_confidence)", [key])
}

restriction_problems contains msg if {
	classes := object.get(granted, "abstain_classes", [])
	not class_indices(classes)
	msg := sprintf("model.restrictions.abstain_classes must be a list of class indices, got %v", [classes])
}

restriction_problems contains msg if {
	cap := object.get(granted, "max_confidence", 1)
	not confidence_cap(cap)
	msg := sprintf("model.restrictions.max_confidence must be a number in (0, 1], got %v", [cap])
}

class_indices(classes) if {
	is_array(classes)
	every c in classes {
		is_number(c)
		c >= 0
		c == round(c)
	}
}

confidence_cap(cap) if {
	is_number(cap)
	cap > 0
	cap <= 1
}

model := input.model

thresholds := data.factory.release_thresholds[input.purpose]

verify := data.factory.release_verification[input.purpose]

# METADATA
# description: Why the release is denied; each reason names the field, dataset, metric or user.
deny contains msg if {
	some msg in field_problems
}

deny contains msg if {
	well_formed
	some msg in restriction_problems
}

deny contains msg if {
	well_formed
	count(model.lineage) == 0
	msg := sprintf("model %s has an empty lineage; the sources of a released model must be known", [model.id])
}

deny contains msg if {
	well_formed
	input.recipient == model.site
	msg := sprintf("recipient %s is the site that trained model %s; a release must leave it", [input.recipient, model.id])
}

deny contains msg if {
	well_formed
	some s in model.lineage
	s.local_only == true
	msg := sprintf("model %s was trained on local-only dataset %s of %s and may not leave %s", [
		model.id, s.dataset_id, s.owner, model.site,
	])
}

deny contains msg if {
	well_formed
	some s in model.lineage
	s.owner != input.recipient
	not input.recipient in s.releasable_to
	msg := sprintf("lineage source %s of %s is not releasable to %s", [s.dataset_id, s.owner, input.recipient])
}

deny contains msg if {
	well_formed
	some name, threshold in thresholds
	not is_number(model.metrics[name])
	msg := sprintf("metric %s of model %s is missing (the %s threshold is %v)", [
		name, model.id, input.purpose, threshold,
	])
}

deny contains msg if {
	well_formed
	some name, threshold in thresholds
	value := model.metrics[name]
	value < threshold
	msg := sprintf("metric %s of model %s is %v, below the %s threshold %v", [
		name, model.id, value, input.purpose, threshold,
	])
}

deny contains msg if {
	well_formed
	not satisfied(verify.watermark, model.watermark.verified)
	msg := sprintf("the watermark of model %s is not verified (required for %s)", [model.id, input.purpose])
}

deny contains msg if {
	well_formed
	not satisfied(verify.signature, model.signature.verified)
	msg := sprintf("the signature of model %s is not verified (required for %s)", [model.id, input.purpose])
}

deny contains msg if {
	well_formed
	not is_object(thresholds)
	msg := sprintf("policy data release_thresholds has no entry for purpose %s", [input.purpose])
}

deny contains msg if {
	well_formed
	not is_object(verify)
	msg := sprintf("policy data release_verification has no entry for purpose %s", [input.purpose])
}

deny contains msg if {
	well_formed
	some msg in data.factory.helpers.rejection_reasons(input.approvals)
}

deny contains msg if {
	well_formed
	some msg in data.factory.helpers.self_approval_reasons(input.approvals, input.requested_by)
}

deny contains msg if {
	well_formed
	input.purpose == "review"
	not input.recipient in {s.owner | some s in model.lineage}
	msg := sprintf("%s owns no source in the lineage of model %s; only a data owner of a model may review it", [
		input.recipient, model.id,
	])
}

deny contains msg if {
	well_formed
	input.purpose == "export"
	some s in model.lineage
	s.export_authorized == false
	msg := sprintf("lineage source %s of %s is not export-authorized", [s.dataset_id, s.owner])
}

deny contains msg if {
	well_formed
	input.purpose == "export"
	count(object.get(data.factory.export_licences, input.recipient, [])) == 0
	msg := sprintf("%s holds no export licence (policy data export_licences)", [input.recipient])
}

deny contains msg if {
	well_formed
	input.purpose == "export"
	not valid_licence
	some licence in data.factory.export_licences[input.recipient]
	some msg in licence_problems(licence)
}

valid_licence if {
	some licence in data.factory.export_licences[input.recipient]
	count(licence_problems(licence)) == 0
}

# METADATA
# description: What keeps one licence from covering this export.
licence_problems(licence) := {msg |
	not input.purpose in licence.purposes
	msg := sprintf("export licence %s of %s does not cover purpose \"%s\"", [licence.id, input.recipient, input.purpose])
} | {msg |
	end_use := object.get(input, "end_use", null)
	not end_use in array.concat(licence.end_uses, [null])
	msg := sprintf("export licence %s of %s does not cover end use %v", [licence.id, input.recipient, end_use])
} | {msg |
	some c in object.get(object.get(licence, "required_restrictions", {}), "abstain_classes", [])
	not c in object.get(granted, "abstain_classes", [])
	msg := sprintf("export licence %s of %s requires the model to abstain on class %v; model %s does not", [
		licence.id, input.recipient, c, model.id,
	])
} | {msg |
	cap := object.get(licence, "required_restrictions", {}).max_confidence
	returned := object.get(granted, "max_confidence", 1)
	returned > cap
	msg := sprintf("export licence %s of %s requires confidence capped at %v; model %s returns up to %v", [
		licence.id, input.recipient, cap, model.id, returned,
	])
} | {msg |
	data.factory.helpers.today > licence.expires
	msg := sprintf("export licence %s of %s expired on %s", [licence.id, input.recipient, licence.expires])
}

deny contains msg if {
	well_formed
	input.purpose == "export"
	role := data.factory.officers.export_role
	not export_officer_approved
	msg := sprintf("no approval by an %s of %s other than the requester %s", [role, model.site, input.requested_by])
}

export_officer_approved if {
	well_formed
	some a in input.approvals
	data.factory.helpers.approved_by(a, model.site, data.factory.officers.export_role, input.requested_by)
}

deny contains msg if {
	well_formed
	input.purpose == "export"
	role := data.factory.officers.data_owner_role
	some owner in approving_owners
	not owner_officer_approved(owner)
	msg := sprintf("no approval by a %s of %s (data owner in the lineage) other than the requester %s", [
		role, owner, input.requested_by,
	])
}

owner_officer_approved(owner) if {
	well_formed
	some a in input.approvals
	data.factory.helpers.approved_by(a, owner, data.factory.officers.data_owner_role, input.requested_by)
}

deny contains msg if {
	well_formed
	input.purpose == "export"
	export_officer_approved
	some owner in approving_owners
	owner_officer_approved(owner)
	not distinct_approvers(owner)
	msg := sprintf("the export approval and the approval for %s data come from the same user; two distinct users must approve", [owner])
}

distinct_approvers(owner) if {
	well_formed
	some e in input.approvals
	data.factory.helpers.approved_by(e, model.site, data.factory.officers.export_role, input.requested_by)
	some a in input.approvals
	data.factory.helpers.approved_by(a, owner, data.factory.officers.data_owner_role, input.requested_by)
	a.user != e.user
}
