package cli

import (
	"fmt"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/ukai-storage/ukai/api"
)

func (a *app) imageCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "image", Short: "Create, list, inspect and delete disk images"}
	cmd.AddCommand(a.imageExportDiffCmd(), a.imageImportDiffCmd(), a.imageCreateCmd(), a.imageListCmd(), a.imageInfoCmd(), a.imageDeleteCmd(), a.imageSyncCmd(), a.imageVerifyCmd(),
		a.imageSetCmd(), a.imageRelocateCmd(), a.imagePlanCmd(), a.imageAttachCmd(), a.imageDetachCmd(), a.accessGrantCmd(true), a.accessRevokeCmd(true),
		a.imageCloneCmd(), a.imageResizeCmd(), a.imageImportCmd(), a.imageExportDataCmd(), a.imageIostatCmd())
	return cmd
}

func (a *app) imageCreateCmd() *cobra.Command {
	var size, blockSize, output string
	var locations []string
	var minCopies int
	cmd := &cobra.Command{
		Use:   "create NAME --size SIZE [--block-size SIZE] [--locations n1,n2] [--min-copies K]",
		Short: "Create an image (sizes take units: 10G, 512M; block size a power of two from 64K to 64M)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			if size == "" {
				return fmt.Errorf("--size is required")
			}
			sz, err := ParseSize(size)
			if err != nil {
				return fmt.Errorf("--size: %w", err)
			}
			var bs int64
			if blockSize != "" {
				if bs, err = ParseSize(blockSize); err != nil {
					return fmt.Errorf("--block-size: %w", err)
				}
				if bs == 0 {
					return fmt.Errorf("--block-size: must be greater than zero")
				}
			}
			if minCopies < 0 || cmd.Flags().Changed("min-copies") && minCopies == 0 {
				return fmt.Errorf("--min-copies %d: must be at least 1 (a write must reach a copy)", minCopies)
			}
			img, err := a.client().CreateImage(cmd.Context(), api.CreateImageRequest{Name: args[0], Size: sz, BlockSize: bs, Locations: locations, MinCopies: minCopies})
			if err != nil {
				return fmt.Errorf("create image %s: %w", args[0], err)
			}
			if output != "table" {
				return printAs(a.out, output, img)
			}
			fmt.Fprintf(a.out, "created image %s: %s in %d blocks of %s, target %s\n", img.Name, FormatSize(img.Size), img.Blocks, FormatSize(img.BlockSize), img.IQN)
			return nil
		},
	}
	cmd.Flags().StringVar(&size, "size", "", "image size, e.g. 10G")
	cmd.Flags().StringVar(&blockSize, "block-size", "", "block size (default 4M)")
	cmd.Flags().StringSliceVar(&locations, "locations", nil, "nodes holding a copy (default: the node --api points at)")
	cmd.Flags().IntVar(&minCopies, "min-copies", 0, "a write reaching fewer in-sync copies fails (default 1)")
	cmd.Flags().StringVarP(&output, "output", "o", "table", "output format: table, json or yaml")
	return cmd
}

func (a *app) imageListCmd() *cobra.Command {
	var output string
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List images",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			l, err := a.client().ListImages(cmd.Context())
			if err != nil {
				return fmt.Errorf("list images: %w", err)
			}
			// Snapshots are listed by 'ukai snapshot list IMAGE' (issue 21:
			// they showed here with an empty IQN).
			l.Images = slices.DeleteFunc(l.Images, func(img api.Image) bool { return img.SnapshotOf != "" })
			if output != "table" {
				return printAs(a.out, output, l)
			}
			tw := tabwriter.NewWriter(a.out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "NAME\tSIZE\tBLOCK SIZE\tLOCATIONS\tOUT OF SYNC\tIQN")
			for _, img := range l.Images {
				var locs []string
				var oos int64
				for _, loc := range img.Locations {
					locs = append(locs, loc.Node)
					oos += loc.OutOfSync
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%s\n", img.Name, FormatSize(img.Size), FormatSize(img.BlockSize), strings.Join(locs, ","), oos, img.IQN)
			}
			if err := tw.Flush(); err != nil {
				return err
			}
			for _, p := range l.Problems {
				fmt.Fprintf(cmd.ErrOrStderr(), "warning: %s\n", p)
			}
			return nil
		},
	}
	cmd.Flags().StringVarP(&output, "output", "o", "table", "output format: table, json or yaml")
	return cmd
}

func (a *app) imageInfoCmd() *cobra.Command {
	var output string
	var blocks bool
	cmd := &cobra.Command{
		Use:   "info NAME [--blocks]",
		Short: "Show an image, its locations and (with --blocks) the per-block sync map",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			// -o json --blocks keeps the full per-block form; the table
			// prints runs (a 1 TiB image is 262,144 blocks).
			var img api.Image
			var err error
			if blocks && output == "table" {
				img, err = a.client().ImageRuns(cmd.Context(), args[0], 0)
			} else {
				img, err = a.client().GetImage(cmd.Context(), args[0], blocks)
			}
			if err != nil {
				return fmt.Errorf("image %s: %w", args[0], err)
			}
			if output != "table" {
				return printAs(a.out, output, img)
			}
			tw := tabwriter.NewWriter(a.out, 0, 4, 2, ' ', 0)
			fmt.Fprintf(tw, "name:\t%s\n", img.Name)
			fmt.Fprintf(tw, "id:\t%s\n", img.ID)
			fmt.Fprintf(tw, "size:\t%s (%d bytes)\n", FormatSize(img.Size), img.Size)
			fmt.Fprintf(tw, "block size:\t%s (%d blocks)\n", FormatSize(img.BlockSize), img.Blocks)
			fmt.Fprintf(tw, "created:\t%s\n", img.Created.Format("2006-01-02 15:04:05 MST"))
			if img.SnapshotOf != "" {
				fmt.Fprintf(tw, "snapshot of:\t%s (read-only, not exported over iSCSI)\n", img.SnapshotOf)
			} else {
				fmt.Fprintf(tw, "iqn:\t%s (LUN 0)\n", img.IQN)
			}
			if len(img.Snapshots) > 0 {
				fmt.Fprintf(tw, "snapshots:\t%s\n", strings.Join(img.Snapshots, ", "))
			}
			fmt.Fprintf(tw, "min copies:\t%d\n", img.MinCopies)
			fmt.Fprintf(tw, "owner:\t%s (attached: %s)\n", dash(img.Owner), dash(img.Attached))
			if img.SyncPaused {
				fmt.Fprintf(tw, "sync:\tPAUSED (ukai image sync %s --resume)\n", img.Name)
			}
			if img.Policy != nil {
				fmt.Fprintf(tw, "desired:\t%s\n", policyString(*img.Policy))
			}
			if img.QoS != nil {
				fmt.Fprintf(tw, "qos:\t%s\n", qosString(*img.QoS))
			}
			for _, e := range img.Exports {
				chap := "no CHAP"
				if e.CHAPUser != "" {
					chap = "CHAP user " + e.CHAPUser
					if e.MutualUser != "" {
						chap += ", mutual " + e.MutualUser
					}
					chap += ", secret in " + e.SecretIn
				}
				fmt.Fprintf(tw, "export:\t%s (%s)\n", e.Initiator, chap)
			}
			fmt.Fprintln(tw, "locations:")
			for _, loc := range img.Locations {
				fmt.Fprintf(tw, "  %s\tin sync %d, syncing %d, out of sync %d\n", loc.Node, img.Blocks-loc.OutOfSync-loc.Syncing, loc.Syncing, loc.OutOfSync)
			}
			for _, loc := range img.Locations {
				if img.Policy != nil && img.Policy.Relocate != nil && loc.Node == img.Policy.Relocate.To {
					done := img.Blocks - loc.OutOfSync - loc.Syncing
					eta := "-"
					if el := time.Since(img.Policy.Relocate.Started); done > 0 && done < img.Blocks {
						eta = (el / time.Duration(done) * time.Duration(img.Blocks-done)).Round(time.Second).String()
					}
					fmt.Fprintf(tw, "relocation:\t%d/%d blocks on %s (%.0f%%), ETA %s\n", done, img.Blocks, loc.Node, 100*float64(done)/float64(img.Blocks), eta)
				}
			}
			if len(img.Plan) > 0 {
				fmt.Fprintln(tw, "plan:")
				for _, ac := range img.Plan {
					fmt.Fprintf(tw, "  %s %s\t%s\n", ac.Kind, ac.Node, ac.Reason)
				}
			}
			if err := tw.Flush(); err != nil {
				return err
			}
			if blocks {
				fmt.Fprintln(a.out, "blocks:")
				for _, line := range RunLines(img.Locations, img.Runs) {
					fmt.Fprintf(a.out, "  %s\n", line)
				}
			}
			return nil
		},
	}
	cmd.Flags().StringVarP(&output, "output", "o", "table", "output format: table, json or yaml")
	cmd.Flags().BoolVar(&blocks, "blocks", false, "include the per-block sync map")
	return cmd
}

func (a *app) imageDeleteCmd() *cobra.Command {
	var now bool
	cmd := &cobra.Command{
		Use:   "delete NAME",
		Short: "Move an image to the trash (its data is purged after the nodes' trash.defer, 24 h by default)",
		Long: "Move an image to the trash: it stops being served at once and its name is free for a new image;\n" +
			"its data and block maps are kept until it is purged, after the nodes' trash.defer (24 h by default).\n" +
			"'ukai trash list|restore|purge' show, bring back or purge it. --now deletes it and its data at once.",
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := a.client().DeleteImage(cmd.Context(), args[0], now); err != nil {
				return fmt.Errorf("delete image %s: %w", args[0], err)
			}
			if now {
				fmt.Fprintf(a.out, "deleted image %s and its data\n", args[0])
			} else {
				fmt.Fprintf(a.out, "moved image %s to the trash ('ukai trash restore %s' brings it back)\n", args[0], args[0])
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&now, "now", false, "skip the trash: delete the image and its data at once")
	return cmd
}
