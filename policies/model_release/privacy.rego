# METADATA
# title: Model release gate — differential-privacy budgets of the data owners
# description: |
#   Part of the model_release gate: each data owner may set, per dataset, the privacy loss it
#   accepts for a model that leaves the site that trained it:
#   data.factory.privacy_budgets[owner][key] = {"epsilon": 8, "delta": 1e-5}, where key is a
#   lineage dataset_id ("origin/shared@1"), the id without its version ("origin/shared"), or "*"
#   (every other dataset of that owner); the first that exists applies. An empty map (the default)
#   sets no budget. Input: each model.lineage entry may carry dp = {epsilon, delta}, the spend on
#   that source along the model's chain (pipelines.learning.privacy: DP-SGD, basic composition
#   over fine-tunes), or dp = null / no dp when some training on it had no bound (trained without
#   DP). A release is denied for every source with a budget whose spend is unbounded or exceeds
#   the budget's epsilon or delta; a source whose owner is the recipient is not checked (its data
#   goes back to its owner), and a budget that is not two numbers denies (fail closed).
package factory.model_release

import rego.v1

# METADATA
# description: The lineage sources whose owner is not the recipient and has set them a budget, with that budget.
budgeted_sources contains [s, budget] if {
	well_formed
	some s in model.lineage
	s.owner != input.recipient
	budget := privacy_budget(s)
}

# METADATA
# description: The budget an owner sets for a source (by id, by id without version, else its "*").
privacy_budget(s) := b if {
	b := data.factory.privacy_budgets[s.owner][s.dataset_id]
} else := b if {
	b := data.factory.privacy_budgets[s.owner][split(s.dataset_id, "@")[0]]
} else := b if {
	b := data.factory.privacy_budgets[s.owner]["*"]
}

# METADATA
# description: A budget or a spend of two numbers.
privacy_pair(p) if {
	is_number(p.epsilon)
	is_number(p.delta)
}

# METADATA
# description: A spend above a budget, in epsilon or in delta.
privacy_exceeds(spent, budget) if spent.epsilon > budget.epsilon

privacy_exceeds(spent, budget) if spent.delta > budget.delta

# METADATA
# description: A budget that is not two numbers.
deny contains msg if {
	some [s, budget] in budgeted_sources
	not privacy_pair(budget)
	msg := sprintf("the privacy budget %s sets for %s is not {epsilon, delta} numbers: %v", [
		s.owner, s.dataset_id, budget,
	])
}

# METADATA
# description: A budgeted source trained on without a bound on its privacy loss.
deny contains msg if {
	some [s, budget] in budgeted_sources
	privacy_pair(budget)
	not privacy_pair(object.get(s, "dp", null))
	msg := sprintf("lineage source %s of %s was trained on without differential privacy (no bound); %s allows epsilon %v, delta %v", [
		s.dataset_id, s.owner, s.owner, budget.epsilon, budget.delta,
	])
}

# METADATA
# description: A budgeted source whose spend exceeds the owner's budget.
deny contains msg if {
	some [s, budget] in budgeted_sources
	privacy_pair(budget)
	privacy_pair(s.dp)
	privacy_exceeds(s.dp, budget)
	msg := sprintf("lineage source %s of %s spends epsilon %v, delta %v; %s allows epsilon %v, delta %v", [
		s.dataset_id, s.owner, round(s.dp.epsilon * 1000) / 1000, s.dp.delta, s.owner, budget.epsilon, budget.delta,
	])
}
