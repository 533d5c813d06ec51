"""PS3.15 Table E.1-1, Application Level Confidentiality Profile Attributes, as data.

Every row of the standard's table (DICOM PS3.15, Annex E, edition 2024e), transcribed: the tag
(``X`` in a tag stands for any hex digit of a repeating group), the Basic Profile's action, and
the action of each option column, ``-`` where the standard leaves that column empty. The only row
not here is "Private Attributes (gggg,eeee) where gggg is odd" (Basic Profile: X), which
``storage.deidentify`` applies to every odd group.

Action codes (PS3.15 E.1.1, Table E.1-1a): D replace with a non-zero-length dummy value; Z
replace with a zero-length value (or a dummy); X remove; K keep (a sequence's items are still
de-identified); C clean (replace with values of similar meaning that identify no one); U replace
a UID with one that is consistent within the set of instances; compound codes (X/Z, X/D, Z/D,
X/Z/D, X/Z/U*) leave the choice to the IOD's attribute type.

Option columns, in order: Retain Safe Private, Retain UIDs, Retain Device Identity, Retain
Institution Identity, Retain Patient Characteristics, Retain Longitudinal Temporal Information
with Full Dates, ... with Modified Dates, Clean Descriptors, Clean Structured Content, Clean
Graphics (PS3.15 E.3.1 to E.3.10).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

OPTIONS = (
    "retain_safe_private",
    "retain_uids",
    "retain_device_identity",
    "retain_institution_identity",
    "retain_patient_characteristics",
    "retain_full_dates",
    "retain_modified_dates",
    "clean_descriptors",
    "clean_structured_content",
    "clean_graphics",
)
BASIC_ACTIONS = frozenset({"D", "Z", "X", "K", "C", "U", "Z/D", "X/Z", "X/D", "X/Z/D", "X/Z/U*"})


@dataclass(frozen=True)
class ProfileRow:
    """One row of Table E.1-1."""

    tag: str  # eight hex digits, "X" for a repeating group's digits: "60XX3000"
    name: str
    basic: str  # the Basic Profile's action
    options: dict[str, str]  # option name -> its action, only where the table gives one

    def action(self, enabled: frozenset[str]) -> str:
        """The action with ``enabled`` options: an option's column, where it has one, replaces
        the Basic Profile's action (PS3.15 E.3: an option changes what the profile does)."""
        for option in OPTIONS:
            if option in enabled and option in self.options:
                return self.options[option]
        return self.basic


# tag, Basic Profile, then the ten option columns in the order of OPTIONS, then the name.
_TABLE_E_1_1 = """
00001000 X       - K - - - - - - - - Affected SOP Instance UID
00001001 U       - K - - - - - - - - Requested SOP Instance UID
00020003 U       - K - - - - - - - - Media Storage SOP Instance UID
00041511 U       - K - - - - - - - - Referenced SOP Instance UID in File
00080012 X/D     - - - - - K C - - - Instance Creation Date
00080013 X/Z/D   - - - - - K C - - - Instance Creation Time
00080014 U       - K - - - - - - - - Instance Creator UID
00080015 X       - - - - - K C - - - Instance Coercion DateTime
00080017 U       - K - - - - - - - - Acquisition UID
00080018 U       - K - - - - - - - - SOP Instance UID
00080019 U       - K - - - - - - - - Pyramid UID
00080020 Z       - - - - - K C - - - Study Date
00080021 X/D     - - - - - K C - - - Series Date
00080022 X/Z     - - - - - K C - - - Acquisition Date
00080023 Z/D     - - - - - K C - - - Content Date
00080024 X       - - - - - K C - - - Overlay Date
00080025 X       - - - - - K C - - - Curve Date
0008002A X/Z/D   - - - - - K C - - - Acquisition DateTime
00080030 Z       - - - - - K C - - - Study Time
00080031 X/D     - - - - - K C - - - Series Time
00080032 X/Z     - - - - - K C - - - Acquisition Time
00080033 Z/D     - - - - - K C - - - Content Time
00080034 X       - - - - - K C - - - Overlay Time
00080035 X       - - - - - K C - - - Curve Time
00080050 Z       - - - - - - - - - - Accession Number
00080054 X       - - C - - - - - - - Retrieve AE Title
00080055 X       - - C - - - - - - - Station AE Title
00080058 U       - K - - - - - - - - Failed SOP Instance UID List
00080080 X/Z/D   - - - K - - - - - - Institution Name
00080081 X       - - - K - - - - - - Institution Address
00080082 X/Z/D   - - - K - - - - - - Institution Code Sequence
00080090 Z       - - - - - - - - - - Referring Physician's Name
00080092 X       - - - - - - - - - - Referring Physician's Address
00080094 X       - - - - - - - - - - Referring Physician's Telephone Numbers
00080096 X       - - - - - - - - - - Referring Physician Identification Sequence
0008009C Z       - - - - - - - - - - Consulting Physician's Name
0008009D X       - - - - - - - - - - Consulting Physician Identification Sequence
00080106 D       - - - - - K C - - - Context Group Version
00080107 D       - - - - - K C - - - Context Group Local Version
00080201 X       - - - - - K C - - - Timezone Offset From UTC
00081000 X       - - C - - - - - - - Network ID
00081010 X/Z/D   - - K - - - - - - - Station Name
00081030 X       - - - - - - - C - - Study Description
0008103E X       - - - - - - - C - - Series Description
00081040 X       - - - K - - - - - - Institutional Department Name
00081041 X       - - - K - - - - - - Institutional Department Type Code Sequence
00081048 X       - - - - - - - - - - Physician(s) of Record
00081049 X       - - - - - - - - - - Physician(s) of Record Identification Sequence
00081050 X       - - - - - - - - - - Performing Physician's Name
00081052 X       - - - - - - - - - - Performing Physician Identification Sequence
00081060 X       - - - - - - - - - - Name of Physician(s) Reading Study
00081062 X       - - - - - - - - - - Physician(s) Reading Study Identification Sequence
00081070 X/Z/D   - - - - - - - - - - Operators' Name
00081072 X/D     - - - - - - - - - - Operator Identification Sequence
00081080 X       - - - - - - - C - - Admitting Diagnoses Description
00081084 X       - - - - - - - C - - Admitting Diagnoses Code Sequence
00081088 X       - - - - - - - C - - Pyramid Description
00081110 X/Z     - K - - - - - - - - Referenced Study Sequence
00081111 X/Z/D   - K - - - - - - - - Referenced Performed Procedure Step Sequence
00081120 X       - K - - - - - - - - Referenced Patient Sequence
00081140 X/Z/U*  - K - - - - - - - - Referenced Image Sequence
00081155 U       - K - - - - - - - - Referenced SOP Instance UID
00081195 U       - K - - - - - - - - Transaction UID
00082111 X       - - - - - - - C - - Derivation Description
00082112 X/Z/U*  - K - - - - - - - - Source Image Sequence
00083010 U       - K - - - - - - - - Irradiation Event UID
00084000 X       - - - - - - - C - - Identifying Comments
00100010 Z       - - - - - - - - - - Patient's Name
00100020 Z/D     - - - - - - - - - - Patient ID
00100021 X       - - - - - - - - - - Issuer of Patient ID
00100030 Z       - - - - - - - - - - Patient's Birth Date
00100032 X       - - - - - - - - - - Patient's Birth Time
00100040 Z       - - - - K - - - - - Patient's Sex
00100050 X       - - - - - - - - - - Patient's Insurance Plan Code Sequence
00100101 X       - - - - - - - - - - Patient's Primary Language Code Sequence
00100102 X       - - - - - - - - - - Patient's Primary Language Modifier Code Sequence
00101000 X       - - - - - - - - - - Other Patient IDs
00101001 X       - - - - - - - - - - Other Patient Names
00101002 X       - - - - - - - - - - Other Patient IDs Sequence
00101005 X       - - - - - - - - - - Patient's Birth Name
00101010 X       - - - - K - - - - - Patient's Age
00101020 X       - - - - K - - - - - Patient's Size
00101030 X       - - - - K - - - - - Patient's Weight
00101040 X       - - - - - - - - - - Patient's Address
00101050 X       - - - - - - - - - - Insurance Plan Identification
00101060 X       - - - - - - - - - - Patient's Mother's Birth Name
00101080 X       - - - - - - - - - - Military Rank
00101081 X       - - - - - - - - - - Branch of Service
00101090 X       - - - - - - - - - - Medical Record Locator
00101100 X       - - - - - - - - - - Referenced Patient Photo Sequence
00102000 X       - - - - - - - C - - Medical Alerts
00102110 X       - - - - C - - C - - Allergies
00102150 X       - - - - - - - - - - Country of Residence
00102152 X       - - - - - - - - - - Region of Residence
00102154 X       - - - - - - - - - - Patient's Telephone Numbers
00102155 X       - - - - - - - - - - Patient's Telecom Information
00102160 X       - - - - K - - - - - Ethnic Group
00102180 X       - - - - - - - C - - Occupation
001021A0 X       - - - - K - - - - - Smoking Status
001021B0 X       - - - - - - - C - - Additional Patient History
001021C0 X       - - - - K - - - - - Pregnancy Status
001021D0 X       - - - - - K C - - - Last Menstrual Date
001021F0 X       - - - - - - - - - - Patient's Religious Preference
00102203 X/Z     - - - - K - - - - - Patient's Sex Neutered
00102297 X       - - - - - - - - - - Responsible Person
00102299 X       - - - - - - - - - - Responsible Organization
00104000 X       - - - - - - - C - - Patient Comments
00120010 D       - - - - - - - - - - Clinical Trial Sponsor Name
00120020 D       - - - - - - - - - - Clinical Trial Protocol ID
00120021 Z       - - - - - - - - - - Clinical Trial Protocol Name
00120022 X       - - - - - - - - - - Issuer of Clinical Trial Protocol ID
00120023 X       - - - - - - - - - - Other Clinical Trial Protocol IDs Sequence
00120030 Z       - - - K - - - - - - Clinical Trial Site ID
00120031 Z       - - - K - - - - - - Clinical Trial Site Name
00120032 X       - - - - - - - - - - Issuer of Clinical Trial Site ID
00120040 D       - - - - - - - - - - Clinical Trial Subject ID
00120041 X       - - - - - - - - - - Issuer of Clinical Trial Subject ID
00120042 D       - - - - - - - - - - Clinical Trial Subject Reading ID
00120043 X       - - - - - - - - - - Issuer of Clinical Trial Subject Reading ID
00120050 Z       - - - - - - - - - - Clinical Trial Time Point ID
00120051 X       - - - - - - - C - - Clinical Trial Time Point Description
00120055 X       - - - - - - - - - - Issuer of Clinical Trial Time Point ID
00120060 Z       - - - K - - - - - - Clinical Trial Coordinating Center Name
00120071 X       - - - - - - - - - - Clinical Trial Series ID
00120072 X       - - - - - - - C - - Clinical Trial Series Description
00120073 X       - - - - - - - - - - Issuer of Clinical Trial Series ID
00120081 D       - - - K - - - - - - Clinical Trial Protocol Ethics Committee Name
00120082 X       - - - - - - - - - - Clinical Trial Protocol Ethics Committee Approval Number
00120086 X       - - - - - K C - - - Ethics Committee Approval Effectiveness Start Date
00120087 X       - - - - - K C - - - Ethics Committee Approval Effectiveness End Date
0014407C X       - - K - - K C - - - Calibration Time
0014407E X       - - K - - K C - - - Calibration Date
0016002B X       - - - - - - - C - - Maker Note
0016004B X       - - - - - - - C - - Device Setting Description
0016004D X       - - - - - - - - - - Camera Owner Name
0016004E X       - - K - - - - - - - Lens Specification
0016004F X       - - K - - - - - - - Lens Make
00160050 X       - - K - - - - - - - Lens Model
00160051 X       - - K - - - - - - - Lens Serial Number
00160070 X       - - - - - - - - - - GPS Version ID
00160071 X       - - - - - - - - - - GPS Latitude Ref
00160072 X       - - - - - - - - - - GPS Latitude
00160073 X       - - - - - - - - - - GPS Longitude Ref
00160074 X       - - - - - - - - - - GPS Longitude
00160075 X       - - - - - - - - - - GPS Altitude Ref
00160076 X       - - - - - - - - - - GPS Altitude
00160077 X       - - - - - - - - - - GPS Time Stamp
00160078 X       - - - - - - - - - - GPS Satellites
00160079 X       - - - - - - - - - - GPS Status
0016007A X       - - - - - - - - - - GPS Measure Mode
0016007B X       - - - - - - - - - - GPS DOP
0016007C X       - - - - - - - - - - GPS Speed Ref
0016007D X       - - - - - - - - - - GPS Speed
0016007E X       - - - - - - - - - - GPS Track Ref
0016007F X       - - - - - - - - - - GPS Track
00160080 X       - - - - - - - - - - GPS Img Direction Ref
00160081 X       - - - - - - - - - - GPS Img Direction
00160082 X       - - - - - - - - - - GPS Map Datum
00160083 X       - - - - - - - - - - GPS Dest Latitude Ref
00160084 X       - - - - - - - - - - GPS Dest Latitude
00160085 X       - - - - - - - - - - GPS Dest Longitude Ref
00160086 X       - - - - - - - - - - GPS Dest Longitude
00160087 X       - - - - - - - - - - GPS Dest Bearing Ref
00160088 X       - - - - - - - - - - GPS Dest Bearing
00160089 X       - - - - - - - - - - GPS Dest Distance Ref
0016008A X       - - - - - - - - - - GPS Dest Distance
0016008B X       - - - - - - - - - - GPS Processing Method
0016008C X       - - - - - - - - - - GPS Area Information
0016008D X       - - - - - K C - - - GPS Date Stamp
0016008E X       - - - - - - - - - - GPS Differential
00180010 Z/D     - - - - - - - C - - Contrast/Bolus Agent
00180027 X       - - - - - K C - - - Intervention Drug Stop Time
00180035 X       - - - - - K C - - - Intervention Drug Start Time
00181000 X/Z/D   - - K - - - - - - - Device Serial Number
00181002 U       - K K - - - - - - - Device UID
00181004 X       - - K - - - - - - - Plate ID
00181005 X       - - K - - - - - - - Generator ID
00181007 X       - - K - - - - - - - Cassette ID
00181008 X       - - K - - - - - - - Gantry ID
00181009 X       - - K - - - - - - - Unique Device Identifier
0018100A X       - - K - - - - - - - UDI Sequence
0018100B U       - K K - - - - - - - Manufacturer's Device Class UID
00181012 X       - - - - - K C - - - Date of Secondary Capture
00181014 X       - - - - - K C - - - Time of Secondary Capture
00181030 X/D     - - - - - - - C - - Protocol Name
00181042 X       - - - - - K C - - - Contrast/Bolus Start Time
00181043 X       - - - - - K C - - - Contrast/Bolus Stop Time
00181072 X       - - - - - K C - - - Radiopharmaceutical Start Time
00181073 X       - - - - - K C - - - Radiopharmaceutical Stop Time
00181078 X       - - - - - K C - - - Radiopharmaceutical Start DateTime
00181079 X       - - - - - K C - - - Radiopharmaceutical Stop DateTime
001811BB D       - - - - - - - C - - Acquisition Field Of View Label
00181200 X       - - K - - K C - - - Date of Last Calibration
00181201 X       - - K - - K C - - - Time of Last Calibration
00181202 X       - - K - - K C - - - DateTime of Last Calibration
00181203 Z       - - K - - K C - - - Calibration DateTime
00181204 X       - - K - - K C - - - Date of Manufacture
00181205 X       - - K - - K C - - - Date of Installation
00181400 X/D     - - - - - - - C - - Acquisition Device Processing Description
00182042 U       - K - - - - - - - - Target UID
00184000 X       - - - - - - - C - - Acquisition Comments
00185011 X       - - K - - - - - - - Transducer Identification Sequence
0018700A X/D     - - K - - - - - - - Detector ID
0018700C X/D     - - K - - K C - - - Date of Last Detector Calibration
0018700E X/D     - - K - - K C - - - Time of Last Detector Calibration
00189074 D       - - - - - K C - - - Frame Acquisition DateTime
00189151 D       - - - - - K C - - - Frame Reference DateTime
00189185 X       - - - - - - - C - - Respiratory Motion Compensation Technique Description
00189367 D       - - K - - - - - - - X-Ray Source ID
00189369 D       - - - - - K C - - - Source Start DateTime
0018936A D       - - - - - K C - - - Source End DateTime
00189371 D       - - K - - - - - - - X-Ray Detector ID
00189373 X       - - K - - - - - - - X-Ray Detector Label
0018937B X       - - - - - - - C - - Multi-energy Acquisition Description
0018937F X       - - - - - - - C - - Decomposition Description
00189424 X       - - - - - - - C - - Acquisition Protocol Description
00189516 X/D     - - - - - K C - - - Start Acquisition DateTime
00189517 X/D     - - - - - K C - - - End Acquisition DateTime
00189623 D       - - - - - K C - - - Functional Sync Pulse
00189701 D       - - - - - K C - - - Decay Correction DateTime
00189804 D       - - - - - K C - - - Exclusion Start DateTime
00189919 Z/D     - - - - - K C - - - Instruction Performed DateTime
00189937 X       - - - - - - - C - - Requested Series Description
0018A002 X       - - - - - K C - - - Contribution DateTime
0018A003 X       - - - - - - - C - - Contribution Description
0020000D U       - K - - - - - - - - Study Instance UID
0020000E U       - K - - - - - - - - Series Instance UID
00200010 Z       - - - - - - - - - - Study ID
00200027 X       - - - - - - - C - - Pyramid Label
00200052 U       - K - - - - - - - - Frame of Reference UID
00200200 U       - K - - - - - - - - Synchronization Frame of Reference UID
00203401 X       - - K - - - - - - - Modifying Device ID
00203403 X       - - - - - K C - - - Modified Image Date
00203405 X       - - - - - K C - - - Modified Image Time
00203406 X       - - - - - - - - - - Modified Image Description
00204000 X       - - - - - - - C - - Image Comments
00209158 X       - - - - - - - C - - Frame Comments
00209161 U       - K - - - - - - - - Concatenation UID
00209164 U       - K - - - - - - - - Dimension Organization UID
00281199 U       - K - - - - - - - - Palette Color Lookup Table UID
00281214 U       - K - - - - - - - - Large Palette Color Lookup Table UID
00284000 X       - - - - - - - - - - Image Presentation Comments
00320012 X       - - - - - - - - - - Study ID Issuer
00320032 X       - - - - - K C - - - Study Verified Date
00320033 X       - - - - - K C - - - Study Verified Time
00320034 X       - - - - - K C - - - Study Read Date
00320035 X       - - - - - K C - - - Study Read Time
00321000 X       - - - - - K C - - - Scheduled Study Start Date
00321001 X       - - - - - K C - - - Scheduled Study Start Time
00321010 X       - - - - - K C - - - Scheduled Study Stop Date
00321011 X       - - - - - K C - - - Scheduled Study Stop Time
00321020 X       - - K - - - - - - - Scheduled Study Location
00321021 X       - - C - - - - - - - Scheduled Study Location AE Title
00321030 X       - - - - - - - C - - Reason for Study
00321032 X       - - - - - - - - - - Requesting Physician
00321033 X       - - - - - - - - - - Requesting Service
00321040 X       - - - - - K C - - - Study Arrival Date
00321041 X       - - - - - K C - - - Study Arrival Time
00321050 X       - - - - - K C - - - Study Completion Date
00321051 X       - - - - - K C - - - Study Completion Time
00321060 X/Z     - - - - - - - C - - Requested Procedure Description
00321066 X       - - - - - - - C - - Reason for Visit
00321067 X       - - - - - - - C - - Reason for Visit Code Sequence
00321070 X       - - - - - - - C - - Requested Contrast Agent
00324000 X       - - - - - - - C - - Study Comments
00340001 D       - - - - - - - - - - Flow Identifier Sequence
00340002 D       - - - - - - - - - - Flow Identifier
00340005 D       - - - - - - - - - - Source Identifier
00340007 D       - - - - - K C - - - Frame Origin Timestamp
00380004 X       - - - - - - - - - - Referenced Patient Alias Sequence
00380010 X       - - - - - - - - - - Admission ID
00380011 X       - - - - - - - - - - Issuer of Admission ID
00380014 X       - - - - - - - - - - Issuer of Admission ID Sequence
0038001A X       - - - - - K C - - - Scheduled Admission Date
0038001B X       - - - - - K C - - - Scheduled Admission Time
0038001C X       - - - - - K C - - - Scheduled Discharge Date
0038001D X       - - - - - K C - - - Scheduled Discharge Time
0038001E X       - - - - - - - - - - Scheduled Patient Institution Residence
00380020 X       - - - - - K C - - - Admitting Date
00380021 X       - - - - - K C - - - Admitting Time
00380030 X       - - - - - K C - - - Discharge Date
00380032 X       - - - - - K C - - - Discharge Time
00380040 X       - - - - - - - C - - Discharge Diagnosis Description
00380050 X       - - - - C - - - - - Special Needs
00380060 X       - - - - - - - - - - Service Episode ID
00380061 X       - - - - - - - - - - Issuer of Service Episode ID
00380062 X       - - - - - - - C - - Service Episode Description
00380064 X       - - - - - - - - - - Issuer of Service Episode ID Sequence
00380300 X       - - - - - - - - - - Current Patient Location
00380400 X       - - - - - - - - - - Patient's Institution Residence
00380500 X       - - - - C - - C - - Patient State
00384000 X       - - - - - - - C - - Visit Comments
003A0310 U       - K - - - - - - - - Multiplex Group UID
003A0314 D       - - - - - K C - - - Impedance Measurement DateTime
003A0329 X       - - - - - - - C - - Waveform Filter Description
003A032B X       - - - - - - - C - - Filter Lookup Table Description
00400001 X       - - C - - - - - - - Scheduled Station AE Title
00400002 X       - - - - - K C - - - Scheduled Procedure Step Start Date
00400003 X       - - - - - K C - - - Scheduled Procedure Step Start Time
00400004 X       - - - - - K C - - - Scheduled Procedure Step End Date
00400005 X       - - - - - K C - - - Scheduled Procedure Step End Time
00400006 X       - - - - - - - - - - Scheduled Performing Physician's Name
00400007 X       - - - - - - - C - - Scheduled Procedure Step Description
00400009 X       - - - - - - - - - - Scheduled Procedure Step ID
0040000B X       - - - - - - - - - - Scheduled Performing Physician Identification Sequence
00400010 X       - - K - - - - - - - Scheduled Station Name
00400011 X       - - K - - - - - - - Scheduled Procedure Step Location
00400012 X       - - - - C - - - - - Pre-Medication
00400241 X       - - C - - - - - - - Performed Station AE Title
00400242 X       - - K - - - - - - - Performed Station Name
00400243 X       - - - - - - - - - - Performed Location
00400244 X       - - - - - K C - - - Performed Procedure Step Start Date
00400245 X       - - - - - K C - - - Performed Procedure Step Start Time
00400250 X       - - - - - K C - - - Performed Procedure Step End Date
00400251 X       - - - - - K C - - - Performed Procedure Step End Time
00400253 X       - - - - - - - - - - Performed Procedure Step ID
00400254 X       - - - - - - - C - - Performed Procedure Step Description
00400275 X       - - - - - - - C - - Request Attributes Sequence
00400280 X       - - - - - - - C - - Comments on the Performed Procedure Step
00400310 X       - - - - - - - C - - Comments on Radiation Dose
0040050A X       - - - - - - - - - - Specimen Accession Number
00400512 D       - - - - - - - - - - Container Identifier
00400513 Z       - - - - - - - - - - Issuer of the Container Identifier Sequence
0040051A X       - - - - - - - C - - Container Description
00400551 D       - - - - - - - - - - Specimen Identifier
00400554 U       - K - - - - - - - - Specimen UID
00400555 X/Z     - - - - - - - - C - Acquisition Context Sequence
00400562 Z       - - - - - - - - - - Issuer of the Specimen Identifier Sequence
00400600 X       - - - - - - - C - - Specimen Short Description
00400602 X       - - - - - - - C - - Specimen Detailed Description
00400610 Z       - - - - - - - - C - Specimen Preparation Sequence
004006FA X       - - - - - - - - - - Slide Identifier
00401001 X       - - - - - - - - - - Requested Procedure ID
00401002 X       - - - - - - - C - - Reason for the Requested Procedure
00401004 X       - - - - - - - - - - Patient Transport Arrangements
00401005 X       - - - - - - - - - - Requested Procedure Location
0040100A X       - - - - - - - C - - Reason for Requested Procedure Code Sequence
00401010 X       - - - - - - - - - - Names of Intended Recipients of Results
00401011 X       - - - - - - - - - - Intended Recipients of Results Identification Sequence
00401101 D       - - - - - - - - - - Person Identification Code Sequence
00401102 X       - - - - - - - - - - Person's Address
00401103 X       - - - - - - - - - - Person's Telephone Numbers
00401104 X       - - - - - - - - - - Person's Telecom Information
00401400 X       - - - - - - - C - - Requested Procedure Comments
00402001 X       - - - - - - - C - - Reason for the Imaging Service Request
00402004 X       - - - - - K C - - - Issue Date of Imaging Service Request
00402005 X       - - - - - K C - - - Issue Time of Imaging Service Request
00402008 X       - - - - - - - - - - Order Entered By
00402009 X       - - - - - - - - - - Order Enterer's Location
00402010 X       - - - - - - - - - - Order Callback Phone Number
00402011 X       - - - - - - - - - - Order Callback Telecom Information
00402016 Z       - - - - - - - - - - Placer Order Number / Imaging Service Request
00402017 Z       - - - - - - - - - - Filler Order Number / Imaging Service Request
00402400 X       - - - - - - - C - - Imaging Service Request Comments
00403001 X       - - - - - - - - - - Confidentiality Constraint on Patient Data Description
00404005 X       - - - - - K C - - - Scheduled Procedure Step Start DateTime
00404008 X       - - - - - K C - - - Scheduled Procedure Step Expiration DateTime
00404010 X       - - - - - K C - - - Scheduled Procedure Step Modification DateTime
00404011 X       - - - - - K C - - - Expected Completion DateTime
00404023 U       - K - - - - - - - - Referenced General Purpose Sched. Proc. Step Transaction UID
00404025 X       - - K - - - - - - - Scheduled Station Name Code Sequence
00404027 X       - - K - - - - - - - Scheduled Station Geographic Location Code Sequence
00404028 X       - - K - - - - - - - Performed Station Name Code Sequence
00404030 X       - - K - - - - - - - Performed Station Geographic Location Code Sequence
00404034 X       - - - - - - - - - - Scheduled Human Performers Sequence
00404035 X       - - - - - - - - - - Actual Human Performers Sequence
00404036 X       - - - - - - - - - - Human Performer's Organization
00404037 X       - - - - - - - - - - Human Performer's Name
00404050 X       - - - - - K C - - - Performed Procedure Step Start DateTime
00404051 X       - - - - - K C - - - Performed Procedure Step End DateTime
00404052 X       - - - - - K C - - - Procedure Step Cancellation DateTime
0040A023 X       - - - - - K C - - - Findings Group Recording Date (Trial)
0040A024 X       - - - - - K C - - - Findings Group Recording Time (Trial)
0040A027 D       - - - - - - - - - - Verifying Organization
0040A030 D       - - - - - K C - - - Verification DateTime
0040A032 X/D     - - - - - K C - - - Observation DateTime
0040A033 X       - - - - - K C - - - Observation Start DateTime
0040A073 D       - - - - - - - - - - Verifying Observer Sequence
0040A075 D       - - - - - - - - - - Verifying Observer Name
0040A078 X       - - - - - - - - - - Author Observer Sequence
0040A07A X       - - - - - - - - - - Participant Sequence
0040A07C X       - - - - - - - - - - Custodial Organization Sequence
0040A082 Z       - - - - - K C - - - Participation DateTime
0040A088 Z       - - - - - - - - - - Verifying Observer Identification Code Sequence
0040A110 X       - - - - - K C - - - Date of Document or Verbal Transaction (Trial)
0040A112 X       - - - - - K C - - - Time of Document Creation or Verbal Transaction (Trial)
0040A120 D       - - - - - K C - - - DateTime
0040A121 D       - - - - - K C - - - Date
0040A122 D       - - - - - K C - - - Time
0040A123 D       - - - - - - - - - - Person Name
0040A124 U       - - - - - - - - - - UID
0040A13A D       - - - - - K C - - - Referenced DateTime
0040A171 U       - K - - - - - - - - Observation UID
0040A172 U       - K - - - - - - - - Referenced Observation UID (Trial)
0040A192 X       - - - - - K C - - - Observation Date (Trial)
0040A193 X       - - - - - K C - - - Observation Time (Trial)
0040A307 X       - - - - - - - - - - Current Observer (Trial)
0040A352 X       - - - - - - - - - - Verbal Source (Trial)
0040A353 X       - - - - - - - - - - Address (Trial)
0040A354 X       - - - - - - - - - - Telephone Number (Trial)
0040A358 X       - - - - - - - - - - Verbal Source Identifier Code Sequence (Trial)
0040A402 U       - K - - - - - - - - Observation Subject UID (Trial)
0040A730 D       - - - - - - - - C - Content Sequence
0040DB06 X       - - - - - K C - - - Template Version
0040DB07 X       - - - - - K C - - - Template Local Version
0040DB0C U       - K - - - - - - - - Template Extension Organization UID
0040DB0D U       - K - - - - - - - - Template Extension Creator UID
0040E004 X       - - - - - K C - - - HL7 Document Effective Time
00420011 D       - - - - - - - - - - Encapsulated Document
00440004 X       - - - - - K C - - - Approval Status DateTime
0044000B X       - - - - - K C - - - Product Expiration DateTime
00440010 X       - - - - - K C - - - Substance Administration DateTime
00440104 D       - - - - - K C - - - Assertion DateTime
00440105 X       - - - - - K C - - - Assertion Expiration DateTime
0050001B X       - - - - - - - - - - Container Component ID
00500020 X       - - K - - - - - - - Device Description
00500021 X       - - - - - - - C - - Long Device Description
00620021 U       - K - - - - - - - - Tracking UID
00640003 U       - K - - - - - - - - Source Frame of Reference UID
00686226 D       - - - - - K C - - - Effective DateTime
00686270 D       - - - - - K C - - - Information Issue DateTime
006A0003 D       - K - - - - - - - - Annotation Group UID
006A0005 D       - - - - - - - C - - Annotation Group Label
006A0006 X       - - - - - - - C - - Annotation Group Description
00700001 D       - - - - - - - - - C Graphic Annotation Sequence
00700082 X       - - - - - K C - - - Presentation Creation Date
00700083 X       - - - - - K C - - - Presentation Creation Time
00700084 Z/D     - - - - - - - - - - Content Creator's Name
00700086 X       - - - - - - - - - - Content Creator's Identification Code Sequence
0070031A U       - K - - - - - - - - Fiducial UID
00701101 U       - K - - - - - - - - Presentation Display Collection UID
00701102 U       - K - - - - - - - - Presentation Sequence Collection UID
0072000A D       - - - - - K C - - - Hanging Protocol Creation DateTime
0072005E D       - - C - - - - - - - Selector AE Value
0072005F D       - - - - K - - - - - Selector AS Value
00720061 D       - - - - - K C - - - Selector DA Value
00720063 D       - - - - - K C - - - Selector DT Value
00720065 D       - - - - - - - - - - Selector OB Value
00720066 D       - - - - - - - C - - Selector LO Value
00720068 D       - - - - - - - C - - Selector LT Value
0072006A D       - - - - - - - - - - Selector PN Value
0072006B D       - - - - - K C - - - Selector TM Value
0072006C D       - - - - - - - C - - Selector SH Value
0072006D D       - - - - - - - - - - Selector UN Value
0072006E D       - - - - - - - C - - Selector ST Value
00720070 D       - - - - - - - C - - Selector UT Value
00720071 D       - - - - - - - - - - Selector UR Value
00741234 X       - - C - - - - - - - Receiving AE
00741236 X       - - C - - - - - - - Requesting AE
00880140 U       - K - - - - - - - - Storage Media File-set UID
00880200 X       - - - - - - - - - - Icon Image Sequence (see Note 11)
00880904 X       - - - - - - - - - - Topic Title
00880906 X       - - - - - - - - - - Topic Subject
00880910 X       - - - - - - - - - - Topic Author
00880912 X       - - - - - - - - - - Topic Keywords
01000420 X       - - - - - K C - - - SOP Authorization DateTime
04000100 U       - - - - - - - - - - Digital Signature UID
04000105 D       - - - - - K C - - - Digital Signature DateTime
04000115 D       - - - - - - - - - - Certificate of Signer
04000310 X       - - - - - K C - - - Certified Timestamp
04000402 X       - - - - - - - - - - Referenced Digital Signature Sequence
04000403 X       - - - - - - - - - - Referenced SOP Instance MAC Sequence
04000404 X       - - - - - - - - - - MAC
04000550 X       - - - - - - - - - - Modified Attributes Sequence
04000551 X       - - - - - - - - - - Nonconforming Modified Attributes Sequence
04000552 X       - - - - - - - - - - Nonconforming Data Element Value
04000561 X       - - - - - - - - - - Original Attributes Sequence
04000562 D       - - - - - K C - - - Attribute Modification DateTime
04000563 D       - - K - - - - - - - Modifying System
04000564 Z       - - - K - - - - - - Source of Previous Values
04000565 D       - - - - - - - C - - Reason for the Attribute Modification
04000600 X       - - - - - - - - - - Instance Origin Status
20300020 X       - - - - - - - - - - Text String
21000040 X       - - - - - K C - - - Creation Date
21000050 X       - - - - - K C - - - Creation Time
21000070 X       - - C - - - - - - - Originator
21000140 D       - - C - - - - - - - Destination AE
22000002 X/Z     - - - - - - - C - - Label Text
22000005 X/Z     - - - - - - - - - - Barcode Value
30020121 X       - - - - - - - C - - Position Acquisition Template Name
30020123 X       - - - - - - - C - - Position Acquisition Template Description
30060002 D       - - - - - - - C - - Structure Set Label
30060004 X       - - - - - - - C - - Structure Set Name
30060006 X       - - - - - - - C - - Structure Set Description
30060008 Z       - - - - - K C - - - Structure Set Date
30060009 Z       - - - - - K C - - - Structure Set Time
30060024 U       - K - - - - - - - - Referenced Frame of Reference UID
30060026 Z       - - - - - - - C - - ROI Name
30060028 X       - - - - - - - C - - ROI Description
3006002D X       - - - - - K C - - - ROI DateTime
3006002E X       - - - - - K C - - - ROI Observation DateTime
30060038 X       - - - - - - - C - - ROI Generation Description
3006004D X       - - - - - - - - - - ROI Creator Sequence
3006004E X       - - - - - - - - - - ROI Interpreter Sequence
30060085 X       - - - - - - - C - - ROI Observation Label
30060088 X       - - - - - - - C - - ROI Observation Description
300600A6 Z       - - - - - - - - - - ROI Interpreter
300600C2 U       - K - - - - - - - - Related Frame of Reference UID
30080024 D       - - - - - K C - - - Treatment Control Point Date
30080025 D       - - - - - K C - - - Treatment Control Point Time
30080054 X/D     - - - - - K C - - - First Treatment Date
30080056 X/D     - - - - - K C - - - Most Recent Treatment Date
30080105 X/Z     - - K - - - - - - - Source Serial Number
30080162 D       - - - - - K C - - - Safe Position Exit Date
30080164 D       - - - - - K C - - - Safe Position Exit Time
30080166 D       - - - - - K C - - - Safe Position Return Date
30080168 D       - - - - - K C - - - Safe Position Return Time
30080250 X/D     - - - - - K C - - - Treatment Date
30080251 X/D     - - - - - K C - - - Treatment Time
300A0002 D       - - - - - - - C - - RT Plan Label
300A0003 X       - - - - - - - C - - RT Plan Name
300A0004 X       - - - - - - - C - - RT Plan Description
300A0006 X/D     - - - - - K C - - - RT Plan Date
300A0007 X/D     - - - - - K C - - - RT Plan Time
300A000B X       - - - - - - - C - - Treatment Sites
300A000E X       - - - - - - - C - - Prescription Description
300A0013 U       - K - - - - - - - - Dose Reference UID
300A0016 X       - - - - - - - C - - Dose Reference Description
300A0072 X       - - - - - - - C - - Fraction Group Description
300A0083 U       - K - - - - - - - - Referenced Dose Reference UID
300A00B2 X/Z     - - K - - - - - - - Treatment Machine Name
300A00C3 X       - - - - - - - C - - Beam Description
300A00DD X       - - - - - - - C - - Bolus Description
300A0196 X       - - - - - - - C - - Fixation Device Description
300A01A6 X       - - - - - - - C - - Shielding Device Description
300A01B2 X       - - - - - - - C - - Setup Technique Description
300A0216 X       - - K - - - - - - - Source Manufacturer
300A022C D       - - - - - K C - - - Source Strength Reference Date
300A022E D       - - - - - K C - - - Source Strength Reference Time
300A02EB X       - - - - - - - C - - Compensator Description
300A0608 D       - - - - - - - C - - Treatment Position Group Label
300A0609 U       - K - - - - - - - - Treatment Position Group UID
300A0611 Z       - - - - - - - - - - RT Accessory Holder Slot ID
300A0615 Z       - - - - - - - - - - RT Accessory Device Slot ID
300A0619 D       - - - - - - - C - - Radiation Dose Identification Label
300A0623 D       - - - - - - - C - - Radiation Dose In-Vivo Measurement Label
300A062A D       - - - - - - - C - - RT Tolerance Set Label
300A0650 U       - K - - - - - - - - Patient Setup UID
300A0676 X       - - - - - - - C - - Equipment Frame of Reference Description
300A067C D       - - - - - - - C - - Radiation Generation Mode Label
300A067D Z       - - - - - - - C - - Radiation Generation Mode Description
300A0700 U       - K - - - - - - - - Treatment Session UID
300A0734 D       - - - - - - - C - - Treatment Tolerance Violation Description
300A0736 D       - - - - - K C - - - Treatment Tolerance Violation DateTime
300A073A D       - - - - - K C - - - Recorded RT Control Point DateTime
300A0741 D       - - - - - K C - - - Interlock DateTime
300A0742 D       - - - - - - - C - - Interlock Description
300A0760 D       - - - - - K C - - - Override DateTime
300A0783 D       - - - - - - - C - - Interlock Origin Description
300A0785 U       - K - - - - - - - - Referenced Treatment Position Group UID
300A078E X       - - - - - - - C - - Patient Treatment Preparation Procedure Parameter Description
300A0792 X       - - - - - - - C - - Patient Treatment Preparation Method Description
300A0794 X       - - - - - - - C - - Patient Setup Photo Description
300A079A X       - - - - - - - C - - Displacement Reference Label
300C0113 X       - - - - - - - C - - Reason for Omission Description
300C0127 D       - - K - - K C - - - Beam Hold Transition DateTime
300E0004 Z       - - - - - K C - - - Review Date
300E0005 Z       - - - - - K C - - - Review Time
300E0008 X/Z     - - - - - - - - - - Reviewer Name
30100006 U       - K - - - - - - - - Conceptual Volume UID
3010000B U       - K - - - - - - - - Referenced Conceptual Volume UID
3010000F Z       - - - - - - - C - - Conceptual Volume Combination Description
30100013 U       - K - - - - - - - - Constituent Conceptual Volume UID
30100015 U       - K - - - - - - - - Source Conceptual Volume UID
30100017 Z       - - - - - - - C - - Conceptual Volume Description
3010001B Z       - - - - - - - - - - Device Alternate Identifier
3010002D D       - - K - - - - - - - Device Label
30100031 U       - K - - - - - - - - Referenced Fiducials UID
30100033 D       - - - - - - - C - - User Content Label
30100034 D       - - - - - - - C - - User Content Long Label
30100035 D       - - - - - - - C - - Entity Label
30100036 X       - - - - - - - C - - Entity Name
30100037 X       - - - - - - - C - - Entity Description
30100038 D       - - - - - - - C - - Entity Long Label
3010003B U       - K - - - - - - - - RT Treatment Phase UID
30100043 Z       - - K - - - - - - - Manufacturer's Device Identifier
3010004C X/D     - - - - - K C - - - Intended Phase Start Date
3010004D X/D     - - - - - K C - - - Intended Phase End Date
30100054 D       - - - - - - - C - - RT Prescription Label
30100056 X/D     - - - - - - - C - - RT Treatment Approach Label
3010005A Z       - - - - - - - C - - RT Physician Intent Narrative
3010005C Z       - - - - - - - C - - Reason for Superseding
30100061 X       - - - - - - - C - - Prior Treatment Dose Description
3010006E U       - K - - - - - - - - Dosimetric Objective UID
3010006F U       - K - - - - - - - - Referenced Dosimetric Objective UID
30100077 X/D     - - - - - - - C - - Treatment Site
3010007A Z       - - - - - - - C - - Treatment Technique Notes
3010007B Z       - - - - - - - C - - Prescription Notes
3010007F Z       - - - - - - - C - - Fractionation Notes
30100081 Z       - - - - - - - C - - Prescription Notes Sequence
30100085 X       - - - - - K C - - - Intended Fraction Start Time
40000010 X       - - - - - - - - - - Arbitrary
40004000 X       - - - - - - - - - - Text Comments
40080040 X       - - - - - - - - - - Results ID
40080042 X       - - - - - - - - - - Results ID Issuer
40080100 X       - - - - - K C - - - Interpretation Recorded Date
40080101 X       - - - - - K C - - - Interpretation Recorded Time
40080102 X       - - - - - - - - - - Interpretation Recorder
40080108 X       - - - - - K C - - - Interpretation Transcription Date
40080109 X       - - - - - K C - - - Interpretation Transcription Time
4008010A X       - - - - - - - - - - Interpretation Transcriber
4008010B X       - - - - - - - C - - Interpretation Text
4008010C X       - - - - - - - - - - Interpretation Author
40080111 X       - - - - - - - - - - Interpretation Approver Sequence
40080112 X       - - - - - K C - - - Interpretation Approval Date
40080113 X       - - - - - K C - - - Interpretation Approval Time
40080114 X       - - - - - - - - - - Physician Approving Interpretation
40080115 X       - - - - - - - C - - Interpretation Diagnosis Description
40080118 X       - - - - - - - - - - Results Distribution List Sequence
40080119 X       - - - - - - - - - - Distribution Name
4008011A X       - - - - - - - - - - Distribution Address
40080200 X       - - - - - - - - - - Interpretation ID
40080202 X       - - - - - - - - - - Interpretation ID Issuer
40080300 X       - - - - - - - C - - Impressions
40084000 X       - - - - - - - C - - Results Comments
50XXXXXX X       - - - - - - - - - C Curve Data
60XX3000 X       - - - - - - - - - C Overlay Data
60XX4000 X       - - - - - - - - - C Overlay Comments
FFFAFFFA X       - - - - - - - - - - Digital Signatures Sequence
FFFCFFFC X       - - - - - - - - - - Data Set Trailing Padding
"""

_ROW = re.compile(r"^([0-9A-FX]{8}) +(\S+) +((?:\S +){10})(.+)$")


def _parse(text: str) -> tuple[ProfileRow, ...]:
    rows = []
    for line in text.strip().splitlines():
        match = _ROW.match(line)
        if match is None or match.group(2) not in BASIC_ACTIONS:
            raise ValueError(f"malformed row of Table E.1-1: {line!r}")
        columns = match.group(3).split()
        options = {o: a for o, a in zip(OPTIONS, columns, strict=True) if a != "-"}
        rows.append(ProfileRow(match.group(1), match.group(4), match.group(2), options))
    return tuple(rows)


TABLE_E_1_1: tuple[ProfileRow, ...] = _parse(_TABLE_E_1_1)
# Rows whose tag is one element (every row but the repeating groups 50xx and 60xx).
ROWS_BY_TAG: dict[int, ProfileRow] = {
    int(row.tag, 16): row for row in TABLE_E_1_1 if "X" not in row.tag
}
# The repeating-group rows: (tag mask, masked tag) -> row; 50XXXXXX is every element of the
# curve groups (5000-501E), 60XX3000 the Overlay Data of every overlay group (6000-601E).
REPEATING_ROWS: tuple[tuple[int, int, ProfileRow], ...] = tuple(
    (
        int("".join("0" if c == "X" else "F" for c in row.tag), 16),
        int(row.tag.replace("X", "0"), 16),
        row,
    )
    for row in TABLE_E_1_1
    if "X" in row.tag
)


def row_for(tag: int) -> ProfileRow | None:
    """The row of Table E.1-1 that covers ``tag``, if any."""
    row = ROWS_BY_TAG.get(tag)
    if row is not None:
        return row
    for mask, value, repeating in REPEATING_ROWS:
        if tag & mask == value and (tag >> 16) % 2 == 0 and (tag >> 16) & 0xFF <= 0x1E:
            return repeating
    return None
