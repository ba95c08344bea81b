# METADATA
# title: Model release gate — revoked models
# description: |
#   Part of the model_release gate: a model version that a withdrawn contribution revoked at the
#   releasing site (its registry tag `factory.revoked`, or its entry in the site's revocation list)
#   is released to no one, for any purpose. Input (optional): model.revoked =
#   {revocation_id, dataset, owner, replaced_by, at}; null or absent when the version is not revoked.
#   Anything but null there (even a malformed value) denies.
package factory.model_release

import rego.v1

# METADATA
# description: The revocation of the model, when one is recorded (absent or null otherwise).
revocation := r if {
	r := input.model.revoked
	r != null
}

# METADATA
# description: A field of the revocation for the message ("unknown" when it is missing).
revocation_field(name) := v if {
	v := revocation[name]
	v != null
} else := "unknown"

# METADATA
# description: The model is revoked here: a withdrawn contribution took it out of service.
deny contains msg if {
	well_formed
	revocation
	msg := sprintf("model %s is revoked (revocation %v: dataset %v withdrawn by %v; replaced by %v); it is released to no one", [
		model.id, revocation_field("revocation_id"), revocation_field("dataset"), revocation_field("owner"),
		revocation_field("replaced_by"),
	])
}
