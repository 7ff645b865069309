package cli

import (
	"fmt"
	"io"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/ukai-storage/ukai/api"
)

func (a *app) nodeCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "node", Short: "Show the nodes of the cluster; cordon, drain and uncordon them"}
	var listOut, infoOut string
	list := &cobra.Command{
		Use:   "list",
		Short: "List the nodes gossip has seen: state, addresses, labels, free space, images held",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkOutput(listOut); err != nil {
				return err
			}
			ns, err := a.client().ListNodes(cmd.Context())
			if err != nil {
				return fmt.Errorf("node list: %w", err)
			}
			if listOut != "table" {
				return printAs(a.out, listOut, ns)
			}
			tw := tabwriter.NewWriter(a.out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "NAME\tSTATE\tAPI\tISCSI\tGOSSIP\tLABELS\tFREE\tIMAGES")
			for _, n := range ns {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", n.Name, nodeState(n), n.APIAddr, n.ISCSIAddr, dash(n.GossipAddr),
					labels(n.Labels), FormatSize(n.Free), images(n.Images))
			}
			return tw.Flush()
		},
	}
	list.Flags().StringVarP(&listOut, "output", "o", "table", "output format: table, json or yaml")
	info := &cobra.Command{
		Use:   "info [NAME]",
		Short: "Show one node (default: the node --api points at, with its iSCSI sessions)",
		Args:  cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkOutput(infoOut); err != nil {
				return err
			}
			var n api.Node
			var err error
			if len(args) == 1 {
				n, err = a.client().GetNode(cmd.Context(), args[0])
			} else {
				n, err = a.client().Node(cmd.Context())
			}
			if err != nil {
				return fmt.Errorf("node info: %w", err)
			}
			if infoOut != "table" {
				return printAs(a.out, infoOut, n)
			}
			return printNode(a.out, n)
		},
	}
	info.Flags().StringVarP(&infoOut, "output", "o", "table", "output format: table, json or yaml")
	cmd.AddCommand(list, info)
	cmd.AddCommand(a.nodeOpCmds()...)
	return cmd
}

// nodeState is the membership state with the operator's: alive,cordoned;
// alive,draining; alive,drained (draining, no copy left).
func nodeState(n api.Node) string {
	switch {
	case n.Draining && n.Images != nil && len(n.Images) == 0:
		return n.State + ",drained"
	case n.Draining:
		return n.State + ",draining"
	case n.Cordoned:
		return n.State + ",cordoned"
	}
	return n.State
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func labels(l map[string]string) string {
	var kv []string
	for k, v := range l {
		kv = append(kv, k+"="+v)
	}
	sort.Strings(kv)
	return dash(strings.Join(kv, ","))
}

func images(l []string) string {
	if l == nil {
		return "?"
	}
	return dash(strings.Join(l, ","))
}

func printNode(w io.Writer, n api.Node) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "name:\t%s\nstate:\t%s (since %s)\n", n.Name, nodeState(n), n.Since.Format(time.RFC3339))
	fmt.Fprintf(tw, "version:\t%s\napi:\t%s\niscsi:\t%s\ngossip:\t%s\n", dash(n.Version), n.APIAddr, n.ISCSIAddr, dash(n.GossipAddr))
	if n.IQNPrefix != "" {
		fmt.Fprintf(tw, "iqn prefix:\t%s\nmetadata:\t%s\n", n.IQNPrefix, n.Metadata)
	}
	fmt.Fprintf(tw, "labels:\t%s\n", labels(n.Labels))
	fmt.Fprintf(tw, "capacity:\t%s (%s free)\n", FormatSize(n.Capacity), FormatSize(n.Free))
	fmt.Fprintf(tw, "images held:\t%s\n", images(n.Images))
	if n.IQNPrefix != "" {
		fmt.Fprintf(tw, "exported:\t%s\n", dash(strings.Join(n.Exported, ",")))
	}
	for _, s := range n.Sessions {
		fmt.Fprintf(tw, "session:\t%s isid %s -> %s from %s (%d commands)\n", s.Initiator, s.ISID, s.Target, s.Remote, s.Commands)
	}
	return tw.Flush()
}
