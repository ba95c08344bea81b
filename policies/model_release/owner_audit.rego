# METADATA
# title: Model release gate — membership-inference audits by data owners
# description: |
#   Part of the model_release gate: a data owner's policy may require, per purpose, that a model
#   holding its data goes further only after the owner audited it where its data lives (a
#   membership-inference attack on its own members and non-members, pipelines.protection.membership)
#   with figures at or below its limits:
#   data.factory.membership_audits[owner][purpose] = {"auc": 0.7, "tpr_at_1pct_fpr": 0.2}
#   (any of auc, tpr_at_1pct_fpr, advantage). Input (optional): model.digest (sha256 of the
#   weights released) and model.membership_audits = [{owner, auc, tpr_at_1pct_fpr, advantage,
#   model_digest, ...}], the release step passing only figures that came inside a verified signed
#   document of that owner. A release whose lineage holds a source of an owner with limits for
#   the purpose is denied when no audit by that owner names the digest of the model released, or
#   when such an audit misses a limited figure or exceeds a limit. Without limits nothing is read.
package factory.model_release

import rego.v1

# METADATA
# description: Per data owner, the audit limits for this purpose, of owners with a source in the lineage.
membership_limits := {owner: limits |
	some owner in {source.owner | some source in membership_sources}
	limits := data.factory.membership_audits[owner][input.purpose]
	is_object(limits)
}

# METADATA
# description: The lineage sources ([] when the lineage is not a list).
membership_sources := s if {
	s := input.model.lineage
	is_array(s)
} else := []

# METADATA
# description: The audits given with the model ([] when none or not a list).
membership_given := a if {
	a := input.model.membership_audits
	is_array(a)
} else := []

# METADATA
# description: The audits by `owner` of exactly the model released (its digest).
membership_audits_of(owner) := [audit |
	some audit in membership_given
	is_object(audit)
	audit.owner == owner
	is_string(input.model.digest)
	audit.model_digest == input.model.digest
]

# METADATA
# description: A data owner requires its audit of this model and none was given.
deny contains msg if {
	well_formed
	some owner, limits in membership_limits
	count(membership_audits_of(owner)) == 0
	msg := sprintf("model %s holds data of %s, whose %s policy requires its membership-inference audit of this model (digest %v) within %v; none was given", [
		model.id, owner, input.purpose, object.get(input.model, "digest", "not given"), limits,
	])
}

# METADATA
# description: An audit of this model by the owner lacks a figure the owner limits.
deny contains msg if {
	well_formed
	some owner, limits in membership_limits
	some audit in membership_audits_of(owner)
	some figure, limit in limits
	not is_number(audit[figure])
	msg := sprintf("membership-inference audit of model %s by %s gives no %s; the %s limit is %v", [
		model.id, owner, figure, input.purpose, limit,
	])
}

# METADATA
# description: An audit of this model by the owner exceeds a limit.
deny contains msg if {
	well_formed
	some owner, limits in membership_limits
	some audit in membership_audits_of(owner)
	some figure, limit in limits
	is_number(audit[figure])
	audit[figure] > limit
	msg := sprintf("membership-inference audit of model %s by %s: %s %v is above the %s limit %v", [
		model.id, owner, figure, audit[figure], input.purpose, limit,
	])
}
