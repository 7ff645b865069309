package placement

import (
	"errors"
	"fmt"
	"slices"
	"sort"
	"strings"
)

// ValidatePolicy refuses a policy that can never be met, whatever the
// nodes' health, with every reason found (joined by "; "):
//   - Replicas < 0;
//   - Locations naming an unknown node, or a node twice;
//   - Locations and Replicas both set but len(Locations) != Replicas;
//   - Replicas (or len(Locations)) greater than the number of known nodes;
//   - SpreadBy with fewer distinct values of the label among the known
//     nodes than the copies wanted, or Locations sharing a value or lacking
//     the label;
//   - Relocate without To, To unknown, To == From, From not a location of
//     img, or Relocate together with Locations;
//   - an image Sync policy that does not validate.
//
// Conditions that depend on the moment (a node down, no free candidate)
// are Plan's business: it answers them with Refuse or Wait actions.
func ValidatePolicy(p ImagePolicy, img ImageState, nodes []NodeInfo) error {
	return validatePolicy(p, img, nodes, false)
}

// validatePolicy is ValidatePolicy; inPlan relaxes "From not a location"
// when To already is one (a finished relocation the executor has not yet
// cleared).
func validatePolicy(p ImagePolicy, img ImageState, nodes []NodeInfo, inPlan bool) error {
	var msgs []string
	bad := func(f string, a ...any) { msgs = append(msgs, fmt.Sprintf(f, a...)) }
	known := map[string]NodeInfo{}
	for _, n := range nodes {
		known[n.Name] = n
	}
	if p.Replicas < 0 {
		bad("replicas %d: must be 0 (keep the current count) or more", p.Replicas)
	}
	seen := map[string]bool{}
	for _, l := range p.Locations {
		if _, ok := known[l]; !ok {
			bad("location %s is not a known node", l)
		}
		if seen[l] {
			bad("location %s is listed twice", l)
		}
		seen[l] = true
	}
	if len(p.Locations) > 0 && p.Replicas > 0 && p.Replicas != len(p.Locations) {
		bad("replicas %d disagrees with the %d locations listed", p.Replicas, len(p.Locations))
	}
	want := p.Replicas
	if len(p.Locations) > 0 {
		want = len(p.Locations)
	}
	if want > len(known) {
		bad("%d copies wanted but only %d nodes are known", want, len(known))
	}
	if p.SpreadBy != "" {
		vals := map[string]bool{}
		for _, n := range nodes {
			if v, ok := n.Labels[p.SpreadBy]; ok {
				vals[v] = true
			}
		}
		if want > len(vals) {
			list := make([]string, 0, len(vals))
			for v := range vals {
				list = append(list, v)
			}
			sort.Strings(list)
			bad("spread by %s needs %d distinct values but the known nodes have %d (%s)", p.SpreadBy, want, len(vals), strings.Join(list, ", "))
		}
		byVal := map[string]string{}
		for _, l := range p.Locations {
			n, ok := known[l]
			if !ok {
				continue
			}
			v, has := n.Labels[p.SpreadBy]
			if !has {
				bad("location %s has no %s label (spread by %s)", l, p.SpreadBy, p.SpreadBy)
				continue
			}
			if o, dup := byVal[v]; dup && o != l {
				bad("locations %s and %s share %s %s (spread by %s)", o, l, p.SpreadBy, v, p.SpreadBy)
			}
			byVal[v] = l
		}
	}
	if r := p.Relocate; r != nil {
		switch {
		case r.To == "":
			bad("relocate: no target node")
		default:
			if _, ok := known[r.To]; !ok {
				bad("relocate: target %s is not a known node", r.To)
			}
			if r.To == r.From {
				bad("relocate: target %s is also the source", r.To)
			}
		}
		if r.From != "" && r.From != r.To && !slices.Contains(img.Locations, r.From) {
			if !inPlan || !slices.Contains(img.Locations, r.To) {
				bad("relocate: source %s is not a location of the image", r.From)
			}
		}
		if len(p.Locations) > 0 {
			bad("relocate and locations are both set: change locations instead")
		}
	}
	if _, err := ParseLocality(string(p.Locality)); err != nil {
		bad("%v", err)
	}
	for _, l := range p.AllowRemote {
		// Only when set: a node named there that leaves later must not
		// make the image's plans fail.
		if _, ok := known[l]; !ok && !inPlan {
			bad("allow-remote %s is not a known node", l)
		}
	}
	if p.Group != "" && !validGroupName(p.Group) {
		bad("group %q: want 1-64 letters, digits, '.', '_' or '-'", p.Group)
	}
	if img.Sync != nil {
		if err := img.Sync.Validate(); err != nil {
			bad("image sync policy: %v", err)
		}
	}
	if len(msgs) == 0 {
		return nil
	}
	return errors.New(strings.Join(msgs, "; "))
}

// Copies is the number of copies img wants: its Replicas, else its
// Locations' count, else the locations it has.
func Copies(img ImageState) int {
	switch {
	case img.Policy.Replicas > 0:
		return img.Policy.Replicas
	case len(img.Policy.Locations) > 0:
		return len(img.Policy.Locations)
	}
	return len(img.Locations)
}

// ValidateGroup refuses img's group when s has no rule for it, or when
// the rule can never be met: an anti-affinity needs as many distinct
// values of its label among the known nodes as the group's images want
// copies in all (img counted with its own policy, the others with
// GroupImage.Copies).
func ValidateGroup(s State, img ImageState) error {
	name := img.Policy.Group
	if name == "" {
		return nil
	}
	g, ok := s.Groups[name]
	if !ok {
		return fmt.Errorf("group %s has no rule (set one with `ukai group set %s --affinity LABEL` or `--anti-affinity LABEL`)", name, name)
	}
	if err := g.Validate(); err != nil {
		return fmt.Errorf("group %s: %w", name, err)
	}
	if g.Kind != AntiAffinity {
		return nil
	}
	total, images := Copies(img), 1
	for _, gi := range s.GroupImages[name] {
		if gi.Name != img.Name {
			total += gi.Copies
			images++
		}
	}
	vals := map[string]bool{}
	for _, n := range s.Nodes {
		if v, ok := n.Labels[g.Label]; ok {
			vals[v] = true
		}
	}
	if total > len(vals) {
		list := make([]string, 0, len(vals))
		for v := range vals {
			list = append(list, v)
		}
		sort.Strings(list)
		return fmt.Errorf("group %s: anti-affinity by %s needs %d distinct %s values for the %d copies of its %d %s, the known nodes have %d (%s)",
			name, g.Label, total, g.Label, total, images, plural(images, "image", "images"), len(vals), strings.Join(list, ", "))
	}
	return nil
}

// validGroupName says whether s can name a group (it is a key in the
// metadata store).
func validGroupName(s string) bool {
	if s == "" || len(s) > 64 {
		return false
	}
	for _, c := range s {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
			return false
		}
	}
	return s != "." && s != ".."
}

// ValidGroupName says whether s can name a group.
func ValidGroupName(s string) bool { return validGroupName(s) }
