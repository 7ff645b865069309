package cli

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/ukai-storage/ukai/api"
)

func (a *app) imageSetCmd() *cobra.Command {
	var replicas int
	var locations, prefer []string
	var spread, group, locality string
	var allowRemote []string
	qf := newQoSFlags()
	cmd := &cobra.Command{
		Use:   "set IMAGE [--replicas N] [--locations n1,n2] [--prefer-labels zone=a] [--spread-by zone] [--group NAME] [--locality MODE] [--iops-limit N] [--bw-limit SIZE] ...",
		Short: "Set the desired copies of an image (ukai converges to it within the sync windows and caps) and its QoS limits",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			var req api.ImagePolicyRequest
			f := cmd.Flags()
			if !f.Changed("replicas") && !f.Changed("locations") && !f.Changed("prefer-labels") && !f.Changed("spread-by") &&
				!f.Changed("group") && !f.Changed("locality") && !f.Changed("allow-remote") {
				if qf.changed(f) {
					return a.imageSetQoS(cmd, args[0], qf)
				}
				return fmt.Errorf("nothing to set: give --replicas, --locations, --prefer-labels, --spread-by, --group, --locality or --allow-remote, or QoS limits (--iops-limit, --bw-limit, ...)")
			}
			var q *api.QoS
			if qf.changed(f) {
				got, err := a.setQoS(cmd, args[0], qf)
				if err != nil {
					return err
				}
				q = &got
			}
			if f.Changed("allow-remote") {
				req.AllowRemote = &allowRemote
			}
			if f.Changed("group") {
				req.Group = &group
			}
			if f.Changed("locality") {
				switch locality {
				case "off", "best-effort", "strict", "default":
				default:
					return fmt.Errorf("--locality %q: want off, best-effort, strict or default (the cluster's)", locality)
				}
				l := locality
				if l == "default" {
					l = ""
				}
				req.Locality = &l
			}
			if f.Changed("replicas") {
				if replicas < 1 {
					return fmt.Errorf("--replicas %d: an image needs at least one copy", replicas)
				}
				req.Replicas = &replicas
			}
			if f.Changed("locations") {
				if len(locations) == 0 {
					return fmt.Errorf("--locations: give at least one node")
				}
				req.Locations = locations
			}
			if f.Changed("prefer-labels") {
				req.PreferLabels = map[string]string{}
				for _, kv := range prefer {
					k, v, ok := strings.Cut(kv, "=")
					if !ok || k == "" {
						return fmt.Errorf("--prefer-labels %q: want key=value", kv)
					}
					req.PreferLabels[k] = v
				}
			}
			if f.Changed("spread-by") {
				req.SpreadBy = &spread
			}
			p, err := a.client().SetImagePolicy(cmd.Context(), args[0], req)
			if err != nil {
				return fmt.Errorf("set %s: %w", args[0], err)
			}
			if q != nil {
				if asked, err := printIfAsked(cmd, a.out, map[string]any{"policy": p, "qos": q}); asked {
					return err
				}
				fmt.Fprintf(a.out, "qos of %s: %s\n", args[0], qosString(*q))
			}
			if asked, err := printIfAsked(cmd, a.out, p); asked {
				return err
			}
			fmt.Fprintf(a.out, "policy of %s: %s\n", args[0], policyString(p))
			return nil
		},
	}
	qf.register(cmd.Flags())
	cmd.Flags().IntVar(&replicas, "replicas", 0, "number of copies")
	cmd.Flags().StringSliceVar(&locations, "locations", nil, "exact nodes holding the copies")
	cmd.Flags().StringSliceVar(&prefer, "prefer-labels", nil, "prefer nodes with these labels for new copies (key=value, repeatable; empty clears)")
	cmd.Flags().StringVar(&spread, "spread-by", "", "label key whose values must differ between copies (empty clears)")
	cmd.Flags().StringVar(&group, "group", "", "the image's group, whose rule (ukai group set) places its copies with the group's others (empty leaves the group)")
	cmd.Flags().StringSliceVar(&allowRemote, "allow-remote", nil, "under strict locality, nodes that may serve the image without a local in-sync copy (empty clears)")
	cmd.Flags().StringVar(&locality, "locality", "", "off, best-effort (a copy follows the node that owns the image), strict, or default (the cluster's placement.locality)")
	return cmd
}

func policyString(p api.ImagePolicy) string {
	var parts []string
	if p.Replicas > 0 {
		parts = append(parts, fmt.Sprintf("replicas %d", p.Replicas))
	}
	if len(p.Locations) > 0 {
		parts = append(parts, "locations "+strings.Join(p.Locations, ","))
	}
	if len(p.PreferLabels) > 0 {
		parts = append(parts, "prefer "+labels(p.PreferLabels))
	}
	if p.SpreadBy != "" {
		parts = append(parts, "spread by "+p.SpreadBy)
	}
	if p.Group != "" {
		parts = append(parts, "group "+p.Group)
	}
	if p.Locality != "" {
		parts = append(parts, "locality "+p.Locality)
	}
	if len(p.AllowRemote) > 0 {
		parts = append(parts, "allow remote "+strings.Join(p.AllowRemote, ","))
	}
	if p.Relocate != nil {
		r := "relocate to " + p.Relocate.To
		if p.Relocate.From != "" {
			r += " from " + p.Relocate.From
		}
		parts = append(parts, r)
	}
	if len(parts) == 0 {
		return "none (keep the copies as they are)"
	}
	return strings.Join(parts, ", ")
}

func (a *app) imageRelocateCmd() *cobra.Command {
	var req api.RelocateRequest
	var wait bool
	var every, timeout time.Duration
	cmd := &cobra.Command{
		Use:   "relocate IMAGE --to NODE [--from NODE] | --cancel",
		Short: "Move a copy next to the VM: add NODE, fill it, then remove the old copy once every block has another in-sync copy",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if req.Cancel == (req.To != "") {
				return fmt.Errorf("give --to NODE, or --cancel")
			}
			p, err := a.client().Relocate(cmd.Context(), args[0], req)
			if err != nil {
				return fmt.Errorf("relocate %s: %w", args[0], err)
			}
			if req.Cancel {
				fmt.Fprintf(a.out, "relocation of %s cancelled; copies stay as they are now\n", args[0])
				return nil
			}
			if !wait {
				fmt.Fprintf(a.out, "relocating %s: %s (follow it with `ukai image info %s`)\n", args[0], policyString(p), args[0])
				return nil
			}
			fmt.Fprintf(a.out, "relocating %s: %s\n", args[0], policyString(p))
			ctx := cmd.Context()
			if timeout > 0 {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, timeout)
				defer cancel()
			}
			return a.waitRelocation(ctx, args[0], req.To, every)
		},
	}
	cmd.Flags().BoolVar(&wait, "wait", false, "wait until the relocation is done, with a progress bar on a terminal")
	cmd.Flags().DurationVar(&every, "interval", time.Second, "with --wait: how often to check")
	cmd.Flags().DurationVar(&timeout, "timeout", 0, "with --wait: give up after this long (exit status 1, the relocation goes on)")
	cmd.Flags().StringVar(&req.To, "to", "", "node that gets the new copy")
	cmd.Flags().StringVar(&req.From, "from", "", "copy to remove once the new one is in sync")
	cmd.Flags().BoolVar(&req.Cancel, "cancel", false, "stop the relocation in progress")
	return cmd
}

func (a *app) imagePlanCmd() *cobra.Command {
	var output string
	cmd := &cobra.Command{
		Use:   "plan IMAGE",
		Short: "Show what the planner would do now for an image, and why, without doing it",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			acts, err := a.client().PlanImage(cmd.Context(), args[0])
			if err != nil {
				return fmt.Errorf("plan %s: %w", args[0], err)
			}
			if output != "table" {
				return printAs(a.out, output, acts)
			}
			if len(acts) == 0 {
				fmt.Fprintf(a.out, "%s: nothing to do\n", args[0])
			}
			printActions(a, acts)
			return nil
		},
	}
	cmd.Flags().StringVarP(&output, "output", "o", "table", "output format: table, json or yaml")
	return cmd
}

func printActions(a *app, acts []api.Action) {
	tw := tabwriter.NewWriter(a.out, 0, 4, 2, ' ', 0)
	for _, ac := range acts {
		what := string(ac.Kind)
		if ac.Node != "" {
			what += " " + ac.Node
		}
		if ac.Kind == api.ActionSync {
			what += fmt.Sprintf(" blocks %d-%d", ac.From, ac.To)
			if ac.Rate > 0 {
				what += " at " + FormatSize(ac.Rate) + "/s"
			}
			if !ac.Deadline.IsZero() {
				what += " until " + ac.Deadline.Format(time.RFC3339)
			}
		}
		if !ac.Until.IsZero() {
			what += " until " + ac.Until.Format(time.RFC3339)
		}
		fmt.Fprintf(tw, "%s\t%s\n", what, ac.Reason)
	}
	tw.Flush()
}

func (a *app) policyCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "policy", Short: "Sync windows and bandwidth caps (per image, per node, or default)"}
	var image, node string
	var def, clear, clearWindows, clearRate bool
	var windows []string
	var tz, maxRate string
	set := &cobra.Command{
		Use:   "set [--image IMAGE | --node NODE | --default] [--sync-window 22:00-06:00 ... | --clear-window] [--tz Asia/Tokyo] [--max-rate 50M | --clear-rate] | --clear",
		Short: "Set when background sync and relocation traffic may run, and how fast (no window: always); only the fields given change",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			n := 0
			scope := ""
			if image != "" {
				n, scope = n+1, "image:"+image
			}
			if node != "" {
				n, scope = n+1, "node:"+node
			}
			if def {
				n, scope = n+1, "default"
			}
			if n != 1 {
				return fmt.Errorf("give exactly one of --image, --node, --default")
			}
			if !clear && len(windows) == 0 && maxRate == "" && tz == "" && !clearWindows && !clearRate {
				return fmt.Errorf("nothing to set: give --sync-window, --max-rate, --tz, --clear-window, --clear-rate or --clear")
			}
			if clearWindows && len(windows) > 0 || clearRate && maxRate != "" {
				return fmt.Errorf("--clear-window with --sync-window, or --clear-rate with --max-rate: give one of each pair")
			}
			req := api.SyncPolicyRequest{Scope: scope, Windows: windows, TZ: tz, MaxRate: maxRate, Clear: clear, ClearWindows: clearWindows, ClearRate: clearRate}
			if err := a.client().SetSyncPolicy(cmd.Context(), req); err != nil {
				return fmt.Errorf("policy set: %w", err)
			}
			if clear {
				fmt.Fprintf(a.out, "sync policy of %s cleared\n", scope)
			} else {
				fmt.Fprintf(a.out, "sync policy of %s set\n", scope)
			}
			return nil
		},
	}
	set.Flags().StringVar(&image, "image", "", "the policy of one image")
	set.Flags().StringVar(&node, "node", "", "the policy of a node (its cap holds across all its images)")
	set.Flags().BoolVar(&def, "default", false, "the policy where no image or node policy is set")
	set.Flags().StringArrayVar(&windows, "sync-window", nil, "daily window HH:MM-HH:MM (repeatable; may cross midnight)")
	set.Flags().StringVar(&tz, "tz", "", "time zone of the windows (IANA name, default UTC)")
	set.Flags().StringVar(&maxRate, "max-rate", "", "copy rate cap in bytes per second (50M, 1G; 0: none)")
	set.Flags().BoolVar(&clear, "clear", false, "remove the policy")
	set.Flags().BoolVar(&clearWindows, "clear-window", false, "remove the windows (sync at any time), keeping the rest")
	set.Flags().BoolVar(&clearRate, "clear-rate", false, "remove the rate cap, keeping the rest")
	var output string
	show := &cobra.Command{
		Use:   "show",
		Short: "Show the sync policies",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			p, err := a.client().SyncPolicies(cmd.Context())
			if err != nil {
				return fmt.Errorf("policy show: %w", err)
			}
			if output != "table" {
				return printAs(a.out, output, p)
			}
			tw := tabwriter.NewWriter(a.out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "SCOPE\tWINDOWS\tTZ\tMAX RATE")
			row := func(scope string, sp api.SyncPolicy) {
				var ws []string
				for _, w := range sp.Windows {
					ws = append(ws, fmt.Sprintf("%02d:%02d-%02d:%02d", w.Start/60, w.Start%60, w.End/60, w.End%60))
				}
				win := strings.Join(ws, ",")
				if win == "" {
					win = "always"
				}
				rate := "none"
				if sp.MaxRate > 0 {
					rate = FormatSize(sp.MaxRate) + "/s"
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", scope, win, dash(sp.TZ), rate)
			}
			if p.Default != nil {
				row("default", *p.Default)
			}
			for _, k := range sortedKeys(p.Nodes) {
				row("node:"+k, p.Nodes[k])
			}
			for _, k := range sortedKeys(p.Images) {
				row("image:"+k, p.Images[k])
			}
			tw.Flush()
			for _, pr := range p.Problems {
				fmt.Fprintf(cmd.ErrOrStderr(), "warning: %s\n", pr)
			}
			return nil
		},
	}
	show.Flags().StringVarP(&output, "output", "o", "table", "output format: table, json or yaml")
	cmd.AddCommand(set, show)
	return cmd
}

func sortedKeys[V any](m map[string]V) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}

func (a *app) statsCmd() *cobra.Command {
	var output string
	cmd := &cobra.Command{
		Use:   "stats",
		Short: "Show what the node --api points at moved: peer bytes in/out, sync bytes, sessions",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			st, err := a.client().Stats(cmd.Context())
			if err != nil {
				return fmt.Errorf("stats: %w", err)
			}
			if output != "table" {
				return printAs(a.out, output, st)
			}
			fmt.Fprintf(a.out, "node %s: %d images exported (%d settled here), %d iSCSI sessions; peer data in %s, out %s; synced %s\n",
				st.Node, st.Images, st.Settled, st.Sessions, FormatSize(st.PeerBytesIn), FormatSize(st.PeerBytesOut), FormatSize(st.SyncBytes))
			return nil
		},
	}
	cmd.Flags().StringVarP(&output, "output", "o", "table", "output format: table, json or yaml")
	return cmd
}

// waitRelocation follows a relocation of image to node until it is done:
// the copy on node in sync and the relocation gone from the policy (the
// old copy removed).
func (a *app) waitRelocation(ctx context.Context, image, to string, every time.Duration) error {
	var pr *progress
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		img, err := a.client().GetImage(ctx, image, false)
		if err != nil {
			return fmt.Errorf("relocate %s: %w", image, err)
		}
		inSync := int64(-1)
		for _, l := range img.Locations {
			if l.Node == to {
				inSync = img.Blocks - l.OutOfSync - l.Syncing
			}
		}
		if pr == nil {
			pr = newProgress(a.out, "relocate "+image+" to "+to, "blocks", img.Blocks)
		}
		if inSync >= 0 {
			pr.set(inSync)
		}
		if img.Policy == nil || img.Policy.Relocate == nil {
			pr.finish()
			if inSync < 0 {
				return fmt.Errorf("relocate %s: the relocation ended without a copy on %s (cancelled?)", image, to)
			}
			fmt.Fprintf(a.out, "relocated %s: copies on %s\n", image, locSummary(img))
			return nil
		}
		select {
		case <-ctx.Done():
			pr.finish()
			return fmt.Errorf("relocate %s: not done yet (%d/%d blocks on %s): %w", image, max(inSync, 0), img.Blocks, to, ctx.Err())
		case <-t.C:
		}
	}
}
