package cli

import (
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
)

func (a *app) trashCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "trash", Short: "Deleted images waiting to be purged: list, restore, purge"}
	cmd.AddCommand(a.trashListCmd(), a.trashRestoreCmd(), a.trashPurgeCmd())
	return cmd
}

func (a *app) trashListCmd() *cobra.Command {
	var output string
	cmd := &cobra.Command{
		Use:     "list",
		Aliases: []string{"ls"},
		Short:   "List the images in the trash, with when each will be purged",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			l, err := a.client().ListTrash(cmd.Context())
			if err != nil {
				return fmt.Errorf("trash: %w", err)
			}
			if output != "table" {
				return printAs(a.out, output, l)
			}
			tw := tabwriter.NewWriter(a.out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "ID\tNAME\tSIZE\tDELETED\tPURGE AFTER\tLOCATIONS")
			for _, e := range l {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%v\n", e.ID, e.Name, FormatSize(e.Size),
					e.Deleted.Local().Format(time.DateTime), e.PurgeAfter.Local().Format(time.DateTime), e.Locations)
			}
			return tw.Flush()
		},
	}
	cmd.Flags().StringVarP(&output, "output", "o", "table", "output format: table, json or yaml")
	return cmd
}

func (a *app) trashRestoreCmd() *cobra.Command {
	var name string
	cmd := &cobra.Command{
		Use:   "restore ID|NAME [--name NEW]",
		Short: "Bring an image back from the trash, with its data, policies and access grants",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			img, err := a.client().RestoreTrash(cmd.Context(), args[0], name)
			if err != nil {
				return fmt.Errorf("restore %s: %w", args[0], err)
			}
			if asked, err := printIfAsked(cmd, a.out, img); asked {
				return err
			}
			fmt.Fprintf(a.out, "restored image %s (%s), target %s\n", img.Name, FormatSize(img.Size), img.IQN)
			return nil
		},
	}
	cmd.Flags().StringVar(&name, "name", "", "restore under this name (when its own is taken by a new image)")
	return cmd
}

func (a *app) trashPurgeCmd() *cobra.Command {
	var all bool
	cmd := &cobra.Command{
		Use:   "purge ID|NAME... | --all",
		Short: "Delete images in the trash for good (their data on every node)",
		RunE: func(cmd *cobra.Command, args []string) error {
			if all == (len(args) > 0) {
				return fmt.Errorf("name the images to purge (ID or NAME), or give --all")
			}
			if all {
				l, err := a.client().ListTrash(cmd.Context())
				if err != nil {
					return fmt.Errorf("trash: %w", err)
				}
				for _, e := range l {
					args = append(args, e.ID)
				}
			}
			for _, ref := range args {
				if err := a.client().PurgeTrash(cmd.Context(), ref); err != nil {
					return fmt.Errorf("purge %s: %w", ref, err)
				}
				fmt.Fprintf(a.out, "purged %s\n", ref)
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&all, "all", false, "purge every image in the trash")
	return cmd
}
